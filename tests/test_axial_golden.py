"""The golden check against the official TF Axial Transformer's outputs (../shared/fixtures/axial): both models'
teacher-forcing logits, NLL and bits per dim, the samples for the fixture's Gumbel noise (the cached sampler) and the
intermediate activations, through the converter."""

import json

import numpy as np
import pytest

from jaxgen.convert import verify
from tests.helpers import AXIAL_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(AXIAL_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


@needs_fixture
def test_fixture_a_matches_official_outputs(tmp_path, capsys):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "axial", str(AXIAL_FIXTURE_A), "--dump", str(dump)])
    report = json.loads(capsys.readouterr().out)
    bad = {k: v for k, v in report["outputs"].items() if not v["ok"]}
    assert rc == 0 and report["ok"], bad
    with np.load(AXIAL_FIXTURE_A) as ref, np.load(dump) as ours:
        out_keys = sorted(k for k in ref.files if k.startswith("out/"))
        assert sorted(ours.files) == out_keys  # every reference output is produced, under the same name
        for k in out_keys:
            assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
            if not np.issubdtype(ref[k].dtype, np.floating):  # the samples: exact
                np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
            else:  # README: 1e-4 relative to max(1, |ref|); measured <= 7.6e-6 (gray nll), logits <= 4.8e-6
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-4 * max(1.0, float(np.abs(ref[k]).max())),
                                           rtol=0, err_msg=k)  # fmt: skip
        for kind in ("gray", "rgb"):  # bits per dim: the README suggests 1e-5
            np.testing.assert_allclose(ours[f"out/{kind}/bpd"], ref[f"out/{kind}/bpd"], atol=1e-5, rtol=0)
            assert ours[f"out/{kind}/sample_margin"].min() > 0.02  # the margin floor: no sample is a near tie
