"""`python -m jaxgen.evaluate`: ADM npz in, the paper metrics out, checked against the reference evaluators'
features of the eval fixture (torch-fidelity's port of ADM's graph); and its one-line errors before any compile."""

import subprocess
import sys

import numpy as np
import pytest

from jaxgen.eval import metrics
from jaxgen.eval.adm_npz import write_npz
from jaxgen.eval.golden import fixture_state_dict
from jaxgen.eval.inception_weights import write_weights_npz
from jaxgen.evaluate import evaluate
from tests.conftest import REPO
from tests.helpers import EVAL_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(EVAL_FIXTURE_A)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    with np.load(EVAL_FIXTURE_A) as npz:
        write_weights_npz(fixture_state_dict(npz), d / "weights.npz")
        write_npz(d / "samples.npz", npz["in/img64_u8"])  # 64 px samples
        write_npz(d / "ref.npz", npz["in/img299_u8"])  # a 299 px reference batch
        ref = {k: npz[f"out/adm_{k}"] for k in ("s64_pool", "s299_pool", "s64_logits_unbiased")}
    return d, ref


@needs_fixture
def test_metrics_equal_those_of_the_reference_features(inputs, tmp_path):
    d, ref = inputs
    samples, weights = str(d / "samples.npz"), str(d / "weights.npz")
    report = evaluate(samples, str(d / "ref.npz"), weights, batch_size=8, k=3)
    assert report["num_samples"] == report["num_ref_images"] == 8
    # FID from torch-fidelity's own features (the ADM graph's port): the only difference is the network's float32
    # rounding (<= 3e-6 of the largest feature, test_eval_inception); with 8 images in 2048-d FID is rank-deficient
    # and sensitive to it: measured 4e-6 relative.
    stats = {k: metrics.feature_statistics(v) for k, v in ref.items() if k.endswith("pool")}
    expected_fid = metrics.frechet_distance(stats["s64_pool"], stats["s299_pool"])
    assert report["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert np.isfinite(report["sfid"]) and report["sfid"] > 0 and report["sfid"] != report["fid"]
    assert report["is"] == pytest.approx(metrics.inception_score(ref["s64_logits_unbiased"]), rel=1e-4)
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    assert report["pipeline"] == "adm" and report["weights"].endswith("weights.npz")

    # A reference batch that only has statistics: they are used as they are (ADM's `main`), sFID and P/R are absent.
    np.savez(tmp_path / "stats_only.npz", mu=stats["s299_pool"].mu, sigma=stats["s299_pool"].sigma)
    only = evaluate(samples, str(tmp_path / "stats_only.npz"), weights, batch_size=8)
    assert only["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert only["sfid"] is None and only["precision"] is None and only["num_ref_images"] == 0


def _error_line(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@needs_fixture
def test_bad_inputs_fail_in_one_line_before_anything_compiles(inputs, tmp_path):
    d, _ = inputs
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "empty_ref.npz", labels=np.zeros(3))
    np.savez(tmp_path / "vgg.npz", **{"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)})
    write_npz(tmp_path / "three.npz", np.zeros((3, 8, 8, 3), np.uint8))
    samples, ref, weights = str(d / "samples.npz"), str(d / "ref.npz"), str(d / "weights.npz")
    # Through the binary: one `error:` line, no traceback.
    assert "uint8" in _error_line(f"--samples={tmp_path / 'float.npz'}", f"--ref={ref}", f"--weights={weights}")
    line = _error_line(f"--samples={samples}", f"--ref={ref}", f"--weights={tmp_path / 'vgg.npz'}")
    assert "is not the FID Inception-v3" in line
    # The same checks in-process (ValueError / FileNotFoundError are what the binary turns into that line).
    with pytest.raises(ValueError, match="neither arr_0"):
        evaluate(samples, str(tmp_path / "empty_ref.npz"), weights)
    with pytest.raises(ValueError, match="at least 4"):  # k = 3 needs k + 1 points
        evaluate(str(tmp_path / "three.npz"), ref, weights)
    with pytest.raises(FileNotFoundError, match="no Inception weight file"):
        evaluate(samples, ref, str(tmp_path / "nope.pth"))
