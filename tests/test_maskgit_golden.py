"""`python -m jaxgen.convert.verify --family maskgit` on the reference fixture: every `out/` array of the official
code (tokenizer, transformer logits, schedules, both decode runs step by step) within the fixture's tolerances, and
`--dump` writes jaxgen's outputs under the same names, shapes and dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxgen.convert import verify
from tests.helpers import SHARED

FIXTURE_A = SHARED / "fixtures" / "maskgit" / "maskgit_fixture_A.npz"


# scan_layers=True: the same fixture through the scanned generator (converted params stacked)
@pytest.mark.needs_fixture(FIXTURE_A)
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_verify_passes_and_dumps_every_output(tmp_path, capsys, scan):
    dump = tmp_path / "ours.npz"
    rc = verify.main([str(FIXTURE_A), "--family", "maskgit", "--dump", str(dump)] + ["--scan-layers"] * scan)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], {k: v for k, v in report["outputs"].items() if not v["ok"]}
    outputs = report["outputs"]
    # measured (jax 0.10.2, CPU): logits 4.1e-6, images 2.2e-5, decode step logits 6.2e-6; ids, schedules, noise exact
    floats = [v["max_scaled_diff"] for v in outputs.values() if "max_scaled_diff" in v]
    assert max(floats) < 5e-5, outputs
    for name in ("tok_indices", "dec_t4.5_final_seqs", "dec_t0_final_seqs", "dec_t4.5_step_masking"):
        assert outputs[name]["exact_match"], name
    for name in ("sched_cosine", "sched_log", "sched_exp", "dec_t4.5_step_gumbel_sample", "dec_t0_step_mask_ratio"):
        assert outputs[name]["max_abs_diff"] == 0.0, name
    with np.load(FIXTURE_A) as ref, np.load(dump) as ours:
        want = {k: (ref[k].shape, ref[k].dtype) for k in ref.files if k.startswith("out/")}
        assert {k: (ours[k].shape, ours[k].dtype) for k in ours.files} == want


def test_compare_treats_equal_infinities_as_equal_and_others_as_failures():
    """MaskGIT's confidence is +inf at known tokens: inf == inf passes, inf vs a number or NaN fails."""
    ref = {"c": np.array([np.inf, 1.0, -2.0], np.float32)}
    assert verify.compare({"c": ref["c"].copy()}, ref, 1e-4)[0]
    assert not verify.compare({"c": np.array([1.0, 1.0, -2.0], np.float32)}, ref, 1e-4)[0]
    assert not verify.compare({"c": np.array([np.inf, np.nan, -2.0], np.float32)}, ref, 1e-4)[0]
    assert not verify.compare({"c": np.array([-np.inf, 1.0, -2.0], np.float32)}, ref, 1e-4)[0]
