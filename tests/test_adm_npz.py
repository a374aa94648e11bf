"""The ADM evaluator's npz format: write / stream-read round trips (plain, compressed, streamed writer), the checks
(float, NCHW, grayscale, Fortran order, truncated, no arr_0 and no statistics), chunk and image directories."""

import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from jaxgen.eval import adm_npz
from jaxgen.eval.adm_npz import NpzImages, check_images, open_samples, write_npz


def _images(n=37, h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_round_trip_images_labels_stats(tmp_path):
    x, labels = _images(), np.arange(37) % 4
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    stats = {"mu": rng.normal(size=6), "sigma": a @ a.T, "mu_s": np.zeros(3, np.float32), "sigma_s": np.eye(3)}
    path = write_npz(tmp_path / "b.npz", x, labels, stats=stats)
    assert [p.name for p in tmp_path.iterdir()] == ["b.npz"]  # the temporary file was renamed, nothing left over
    with zipfile.ZipFile(path) as zf:  # uncompressed like ADM's sample scripts: arr_0 streams without inflating
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    src = NpzImages(path)
    assert (src.num_images, src.shape, len(src)) == (37, (5, 7, 3), 37)
    assert src.labels.dtype == np.int64 and np.array_equal(src.labels, labels)
    got = adm_npz.read_stats(path)
    assert sorted(got) == sorted(stats) and all(v.dtype == np.float64 for v in got.values())
    assert all(np.array_equal(got[k], stats[k]) for k in stats)
    images, ref_stats = adm_npz.read_reference(path)
    assert images.num_images == 37 and sorted(ref_stats) == sorted(stats)
    with np.load(path) as f:  # what ADM reads
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], x) and f["arr_1"].dtype == np.int64


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_batches_equal_np_load(tmp_path, compressed):
    x = _images()  # 37 images: batches of 8 leave 5
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, x)
    batches = list(NpzImages(path).iter_batches(8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert all(b.dtype == np.uint8 and b.flags.writeable for b in batches)
    with np.load(path) as f:
        assert np.array_equal(np.concatenate(batches), f["arr_0"])
    assert np.array_equal(np.concatenate(list(NpzImages(path).iter_batches(64))), x)  # one short batch
    assert NpzImages(path).labels is None


def test_streamed_writer_equals_savez(tmp_path):
    x, labels = _images(), np.arange(37) % 5
    path = adm_npz.write_npz_stream(tmp_path / "big.npz", adm_npz.rebatch([x[:3], x[3:20], x[20:]], 6), 37, (5, 7, 3),
                                    labels=labels)  # fmt: skip
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], x) and np.array_equal(f["arr_1"], labels)
    with zipfile.ZipFile(path) as zf:  # zip64 member headers: arr_0 may pass 4 GiB (50,000 x 256 x 256 x 3)
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    with pytest.raises(ValueError, match=r"got 20 images, arr_0 needs 37"):
        adm_npz.write_npz_stream(tmp_path / "short.npz", [x[:20]], 37, (5, 7, 3))
    assert not list(tmp_path.glob(".*"))  # a failed write leaves no temporary file
    assert not (tmp_path / "short.npz").exists()


def test_rebatch():
    parts = np.split(np.arange(15), [3, 3, 10, 11])  # sizes 3, 0, 7, 1, 4
    out = list(adm_npz.rebatch(parts, 4))
    assert [len(b) for b in out] == [4, 4, 4, 3] and np.array_equal(np.concatenate(out), np.arange(15))


def test_layout_errors_say_what_to_do(tmp_path):
    x = _images(4)
    cases = {
        re.escape("float32 [4,5,7,3]; the ADM format wants uint8 0..255: for floats in [0, 1], np.clip(np.round(x *"): (
            x.astype(np.float32) / 255
        ),
        "int64 .*np.clip\\(x, 0, 255\\)": x.astype(np.int64),
        "looks like NCHW.*x.transpose\\(0, 2, 3, 1\\)": x.transpose(0, 3, 1, 2),
        "grayscale \\[N,H,W\\] -> repeat to 3 channels": x[..., 0],
        "grayscale \\[N,H,W,1\\] -> repeat to 3 channels: np.repeat\\(x, 3, axis=-1\\)": x[..., :1],
        "RGBA.*x\\[..., :3\\]": np.concatenate([x, x[..., :1]], -1),
        "empty": np.zeros((2, 0, 4, 3), np.uint8),
    }
    for pattern, bad in cases.items():
        with pytest.raises(ValueError, match=pattern) as e:
            check_images(bad, "samples.npz arr_0")
        assert "\n" not in str(e.value) and "images in samples.npz arr_0 are" in str(e.value)
        np.savez(tmp_path / "bad.npz", bad)  # the reader says the same from the .npy header, before reading data
        with pytest.raises(ValueError, match=pattern):
            NpzImages(tmp_path / "bad.npz")
        with pytest.raises(ValueError, match=pattern):
            write_npz(tmp_path / "w.npz", bad)
    with pytest.raises(ValueError, match=r"labels for .* want one integer class per image: \[4\]"):
        write_npz(tmp_path / "w.npz", x, labels=np.zeros(3))


def test_fortran_truncated_and_missing_arrays(tmp_path):
    x = _images(6)
    np.savez(tmp_path / "f.npz", np.asfortranarray(x))
    with pytest.raises(ValueError, match=r"Fortran order.*np.ascontiguousarray"):
        NpzImages(tmp_path / "f.npz")
    good = write_npz(tmp_path / "good.npz", x)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:200])  # the zip directory is gone
    with pytest.raises(ValueError, match=r"not a readable npz"):
        NpzImages(tmp_path / "cut.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:  # a complete zip whose arr_0 lacks data
        with zipfile.ZipFile(good) as src:
            zf.writestr("arr_0.npy", src.read("arr_0.npy")[:-10])
    with pytest.raises(ValueError, match=r"truncated or damaged"):
        NpzImages(tmp_path / "short.npz")
    np.savez(tmp_path / "none.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match=r"none.npz has neither arr_0 images nor mu/sigma statistics.*VIRTUAL"):
        adm_npz.open_reference_images(tmp_path / "none.npz")
    with pytest.raises(ValueError, match=r"has no arr_0"):
        NpzImages(tmp_path / "none.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))  # a statistics-only reference is fine
    assert adm_npz.open_reference_images(tmp_path / "stats.npz") is None
    assert sorted(adm_npz.read_reference(tmp_path / "stats.npz")[1]) == ["mu", "sigma"]
    np.savez(tmp_path / "half.npz", x, mu=np.zeros(4))
    with pytest.raises(ValueError, match=r"has mu but no sigma"):
        adm_npz.read_stats(tmp_path / "half.npz")
    with pytest.raises(ValueError, match=r"covariance"):
        write_npz(tmp_path / "w.npz", x, stats={"mu": np.zeros(4), "sigma": np.eye(3)})


def test_open_samples_npz_chunks_and_image_dirs(tmp_path):
    x = _images(11)
    write_npz(tmp_path / "one.npz", x)
    assert open_samples(tmp_path / "one.npz").num_images == 11
    chunks = tmp_path / "chunks"
    for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 11)]):
        write_npz(chunks / f"chunk_{i:05d}.npz", x[a:b], np.arange(a, b))
    (chunks / ".chunk_00003.npz.123.tmp").write_bytes(b"partial")  # an unfinished atomic write is skipped
    src = open_samples(chunks)
    assert (src.num_images, src.shape) == (11, (5, 7, 3)) and np.array_equal(src.labels, np.arange(11))
    batches = list(src.iter_batches(5))  # batches cross the chunk boundaries
    assert [len(b) for b in batches] == [5, 5, 1] and np.array_equal(np.concatenate(batches), x)

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(5):
        Image.fromarray(x[i]).save(pngs / f"{i:03d}.png")
    Image.fromarray(x[5]).convert("L").save(pngs / "005.png")  # grayscale -> RGB
    Image.fromarray(x[6]).save(pngs / "006.jpg", quality=95)
    src = open_samples(pngs)
    assert (src.num_images, src.shape, src.labels) == (7, (5, 7, 3), None)
    got = np.concatenate(list(src.iter_batches(3)))
    assert got.shape == (7, 5, 7, 3) and got.dtype == np.uint8 and np.array_equal(got[:5], x[:5])
    assert (got[5, ..., 0] == got[5, ..., 1]).all()  # the grayscale image repeated to 3 channels
    Image.fromarray(_images(1, 6, 7)[0]).save(pngs / "007.png")
    with pytest.raises(ValueError, match=r"007.png is 7x6 .* but 000.png is 7x5"):
        open_samples(pngs)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no .npz files and no PNG/JPEG images") as e:
        open_samples(tmp_path / "empty")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        open_samples(tmp_path / "nowhere")
