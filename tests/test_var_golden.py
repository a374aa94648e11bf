"""The golden check against the official PyTorch VAR's outputs (../shared/fixtures/var)."""

import json

import numpy as np
import pytest

from jaxgen.convert import verify
from jaxgen.convert.var import var_configs_from_fixture
from tests.helpers import VAR_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(VAR_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


# scan_layers=True: the same fixture through the scanned generator (converted params stacked)
@needs_fixture
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_fixture_a_matches_official_outputs(tmp_path, capsys, scan):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "var", str(VAR_FIXTURE_A), "--dump", str(dump)] + ["--scan-layers"] * scan)
    report = json.loads(capsys.readouterr().out)
    bad = {k: v for k, v in report["outputs"].items() if not v["ok"]}
    assert rc == 0 and report["ok"], bad
    with np.load(VAR_FIXTURE_A) as ref, np.load(dump) as ours:
        out_keys = sorted(k for k in ref.files if k.startswith("out/"))
        assert len(out_keys) == 25
        assert sorted(ours.files) == out_keys  # every reference output is produced, under the same name
        for k in out_keys:
            assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
            if np.issubdtype(ref[k].dtype, np.integer):
                np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
            else:  # README: 1e-4 absolute covers CPU/thread differences of the reference itself (<= 1.9e-5)
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-4, rtol=0, err_msg=k)


def test_compare_flags_a_wrong_index_and_a_drifted_float():
    ref = {"idx": np.array([[1, 2, 3]]), "x": np.array([0.5, 2000.0], np.float32)}
    ok, _ = verify.compare({"idx": np.array([[1, 2, 3]]), "x": np.array([0.50005, 2000.1])}, ref, 1e-4)
    assert ok  # within 1e-4 * max(1, |ref|)
    ok, rep = verify.compare({"idx": np.array([[1, 2, 4]]), "x": np.array([0.5002, 2000.0])}, ref, 1e-4)
    assert not ok and rep["idx"]["mismatches"] == 1 and not rep["x"]["ok"]
    ok, rep = verify.compare({"x": ref["x"]}, ref, 1e-4)
    assert not ok and rep["idx"]["error"] == "not produced"


@needs_fixture
def test_config_is_read_from_the_fixture_json():
    meta = json.loads(VAR_FIXTURE_A.with_suffix(".json").read_text())
    meta["var_ctor"]["patch_nums"] = meta["vae_ctor"]["v_patch_nums"] = [1, 2, 4, 6]
    meta["var_ctor"]["num_classes"] = 7
    vae_cfg, var_cfg = var_configs_from_fixture(meta)
    assert vae_cfg.patch_nums == (1, 2, 4, 6) and vae_cfg.image_size == 96
    assert var_cfg.seq_len == 1 + 4 + 16 + 36 and var_cfg.num_classes == 7
    assert var_cfg.vocab_size == meta["vae_ctor"]["vocab_size"]
