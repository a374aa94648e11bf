"""The golden check against the official PyTorch HMAR's outputs (../shared/fixtures/hmar): the VQVAE, both stages'
teacher forcing and losses, and three sampling runs step by step (greedy with refinement, upstream's top-k 1,
pure next-scale)."""

import json

import numpy as np
import pytest

from jaxgen.convert import verify
from jaxgen.convert.hmar import hmar_configs_from_fixture
from jaxgen.convert.hmar_fixture import sampling_settings
from tests.helpers import HMAR_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(HMAR_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


# scan_layers=True: the same fixture through the scanned generator (converted params stacked)
@needs_fixture
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unrolled", "scanned"])
def test_fixture_a_matches_official_outputs(tmp_path, capsys, scan):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "hmar", str(HMAR_FIXTURE_A), "--dump", str(dump)] + ["--scan-layers"] * scan)
    report = json.loads(capsys.readouterr().out)
    bad = {k: v for k, v in report["outputs"].items() if not v["ok"]}
    assert rc == 0 and report["ok"], bad
    with np.load(HMAR_FIXTURE_A) as ref, np.load(dump) as ours:
        out_keys = sorted(k for k in ref.files if k.startswith("out/"))
        assert sorted(ours.files) == out_keys  # every reference output is produced, under the same name
        for k in out_keys:
            assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
            if not np.issubdtype(ref[k].dtype, np.floating):  # ids and masks: exact
                np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
            else:  # README: 1e-4 relative to max(1, |ref|); measured <= 1.3e-5 (decoder output), logits <= 8.3e-6
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-4 * max(1.0, float(np.abs(ref[k]).max())),
                                           rtol=0, err_msg=k)  # fmt: skip
        assert ours["out/gen_s3_m2_mask"].sum() == 2 * 8  # the last scale's second mask step re-draws 8 per image


@needs_fixture
def test_config_and_runs_are_read_from_the_fixture_json():
    meta = json.loads(HMAR_FIXTURE_A.with_suffix(".json").read_text())
    meta["hmar_ctor"]["patch_nums"] = meta["vae_ctor"]["v_patch_nums"] = [1, 2, 4, 6]
    meta["hmar_ctor"].update(depth=5, n_layers_train=3, num_classes=7)
    vae_cfg, cfg = hmar_configs_from_fixture(meta)
    assert vae_cfg.patch_nums == cfg.patch_nums == (1, 2, 4, 6) and cfg.seq_len == 57
    assert (cfg.depth, cfg.mask_layers, cfg.base_layers, cfg.num_classes) == (5, 3, 2, 7)
    runs = {name: sampling_settings(spec) for name, spec in meta["sampling"].items()}
    assert runs["gen"].greedy and runs["gen"].refine and runs["gen"].top_k == 0
    assert not runs["gen1"].greedy and runs["gen1"].top_k == 1  # upstream's own draw: deterministic with top-k 1
    assert not runs["gen0"].refine
