"""The sampling binary: a grid PNG, tokens and a report from a config; a misspelled override is an error; with
--num_samples, class-balanced ADM npz chunks that resume, split over processes and devices, and the final npz."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxgen.config_util import load_config
from jaxgen.eval.adm_npz import NpzImages, float_to_uint8
from jaxgen.eval.grids import image_grid
from jaxgen.sample import DataParallelSampler, check_chunking, init_or_load, sample_grid, sample_npz

REPO = Path(__file__).resolve().parents[1]


def test_sample_grid_writes_png_tokens_and_report(tmp_path):
    cfg = load_config(str(REPO / "configs/var_tiny.py"))
    cfg.grid.classes = (0, 7)
    cfg.grid.per_class = 3
    cfg.vae.ch_mult, cfg.vae.num_res_blocks = (1, 2), 1  # an 8 px tokenizer: compiles in seconds
    report = sample_grid(cfg, tmp_path)
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 5  # a real picture, not a blank canvas
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape == (6, 8, 8, 3) and list(f["labels"]) == [0, 0, 0, 7, 7, 7]
        assert [f[f"indices_s{k}"].shape[1] for k in range(4)] == [1, 4, 9, 16]
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == report["num_images"] == 6


def test_image_grid_layout():
    imgs = np.zeros((5, 4, 4, 3))
    imgs[4] = 1.0
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    assert g[11:15, 1:5].min() == 255 and g[1:5, 1:5].max() == 0


def test_misspelled_override_names_the_field(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgen.sample",
            "--config=configs/var_tiny.py",
            "--config.sampling.topk=3",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "topk" in res.stderr


# ---- --num_samples: class-balanced samples as an ADM npz, in resumable chunks --------------------------------------


def _tiny_config():
    """var_tiny at 4 px (patch_nums 1-2, one block, 4 classes): compiles in seconds on 8 fake CPU devices."""
    cfg = load_config(str(REPO / "configs/var_tiny.py"))
    cfg.vae.ch_mult, cfg.vae.num_res_blocks, cfg.vae.patch_nums = (1, 2), 1, (1, 2)
    cfg.var.depth, cfg.var.num_classes = 1, 4
    return cfg


@pytest.fixture(scope="module")
def tiny():
    """(config, models, a DataParallelSampler over the 8 devices): one compile shared by the tests below."""
    cfg = _tiny_config()
    models = init_or_load(cfg)
    return cfg, models, DataParallelSampler(cfg, models=models)


def _mtimes(workdir):
    return {p.name: p.stat().st_mtime_ns for p in sorted((workdir / "samples").glob("chunk_*.npz"))}


def test_sample_npz_chunks_resume_and_final_npz(tiny, tmp_path, caplog):
    cfg, _, dp = tiny
    assert dp.num_devices == 8
    first = sample_npz(cfg, tmp_path, 16, chunk_size=8, batch_size=8, sampler=dp)  # "a crash at 16": 2 chunks
    assert (first["chunks_made"], first["num_images"]) == (2, 16) and (tmp_path / "samples_16x4x4x3.npz").exists()
    kept = _mtimes(tmp_path)
    assert list(kept) == ["chunk_00000.npz", "chunk_00001.npz"]
    report = sample_npz(cfg, tmp_path, 24, chunk_size=8, batch_size=8, sampler=dp)  # resumes: makes only chunk 2
    assert (report["chunks_made"], report["chunks_kept"], report["chunks"]) == (1, 2, 3)
    assert {k: v for k, v in _mtimes(tmp_path).items() if k in kept} == kept
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == 24

    final = tmp_path / "samples_24x4x4x3.npz"
    src = NpzImages(final)
    assert (src.num_images, src.shape) == (24, (4, 4, 3))
    with np.load(final) as f:  # what the ADM evaluator reads
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (24, 4, 4, 3) and images.std() > 5
    assert np.array_equal(np.concatenate(list(src.iter_batches(5))), images)
    assert np.array_equal(labels, np.arange(24) % 4) and np.bincount(labels).tolist() == [6, 6, 6, 6]
    chunks = [np.load(tmp_path / "samples" / name) for name in _mtimes(tmp_path)]
    assert np.array_equal(np.concatenate([c["arr_0"] for c in chunks]), images)
    assert np.array_equal(images[:16], np.load(tmp_path / "samples_16x4x4x3.npz")["arr_0"])

    # a deleted chunk and a truncated one are made again (the same images), the others are kept
    before = _mtimes(tmp_path)
    (tmp_path / "samples" / "chunk_00001.npz").unlink()
    damaged = tmp_path / "samples" / "chunk_00002.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = sample_npz(cfg, tmp_path, 24, chunk_size=8, batch_size=8, sampler=dp)
    assert again["chunks_made"] == 2 and _mtimes(tmp_path)["chunk_00000.npz"] == before["chunk_00000.npz"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("chunk_00002.npz damaged" in m and "making it again" in m for m in messages), messages
    assert np.array_equal(np.load(final)["arr_0"], images)  # deterministic: chunk c's key is fold_in(key, c)

    # chunks made with other settings are not mixed in
    cfg.sampling.top_k = 8
    try:
        with pytest.raises(ValueError, match=r"made with other settings: sampling.top_k=16 \(now 8\)"):
            sample_npz(cfg, tmp_path, 24, chunk_size=8, batch_size=8, sampler=dp)
    finally:
        cfg.sampling.top_k = 16


def test_sample_npz_processes_split_the_chunks(tiny, tmp_path, monkeypatch):
    """Process p of P makes the chunks c % P == p; process 0 writes the npz once every chunk exists."""
    from jax.experimental import multihost_utils

    cfg, _, dp = tiny
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    report = sample_npz(cfg, tmp_path, 20, chunk_size=8, batch_size=8, sampler=dp)  # chunks 0, 1, 2 (4 images)
    assert list(_mtimes(tmp_path)) == ["chunk_00001.npz"] and "npz" not in report
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    report = sample_npz(cfg, tmp_path, 20, chunk_size=8, batch_size=8, sampler=dp)
    assert report["chunks_made"] == 2 and list(_mtimes(tmp_path)) == [f"chunk_{c:05d}.npz" for c in range(3)]
    assert NpzImages(tmp_path / "samples" / "chunk_00002.npz").num_images == 4  # the last chunk is shorter
    with np.load(report["npz"]) as f:
        assert f["arr_0"].shape == (20, 4, 4, 3) and np.array_equal(f["arr_1"], np.arange(20) % 4)


def test_data_parallel_sampler_equals_one_device(tiny):
    """The labels split over 8 devices give the single-device result: the same tokens (the threefry draws are
    partitionable, so they do not depend on the sharding), images equal up to float rounding of the decoder."""
    cfg, models, dp = tiny
    labels, key = np.arange(8) % 4, jax.random.key(3)
    out8 = dp(labels, key)
    assert len(out8.sharding.device_set) == 8 and out8.sharding.spec[0] is not None  # split over the batch
    one = DataParallelSampler(cfg, devices=jax.local_devices()[:1], models=models)
    out1 = np.asarray(one(labels, key))
    np.testing.assert_allclose(np.asarray(out8), out1, atol=1e-5)
    assert np.abs(float_to_uint8(out8).astype(int) - float_to_uint8(out1)).max() <= 1


def test_check_chunking():
    assert check_chunking(50_000, 1000, 0, 1) == 250 and check_chunking(50_000, 1000, 0, 8) == 200
    assert check_chunking(24, 8, 0, 8) == 8 and check_chunking(24, 8, 8, 8) == 8
    for args, pattern in [
        ((24, 10, 8, 8), "--chunk_size=10 must be a multiple of --batch_size=8"),
        ((24, 8, 12, 8), "--batch_size=12 must be a positive multiple of the 8 devices"),
        ((50_000, 1000, 0, 16), "--chunk_size=1000 is not a multiple of the 16 devices"),
        ((0, 8, 8, 8), "--num_samples=0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            check_chunking(*args)


def test_bad_chunk_size_is_one_error_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgen.sample",
            "--config=configs/var_tiny.py",
            f"--workdir={tmp_path}",
            "--num_samples=24",
            "--chunk_size=10",
            "--batch_size=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --chunk_size=10 must be a multiple of --batch_size=8")
    assert not (tmp_path / "samples").exists()
