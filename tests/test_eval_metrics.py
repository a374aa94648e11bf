"""jaxgen.eval.metrics against the reference evaluators' numbers (../shared/fixtures/eval, README there) and against
brute-force numpy on random data."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from jax.sharding import Mesh

from jaxgen.eval import metrics as M
from tests.helpers import EVAL_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(EVAL_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure
SETS = ("small", "pool")


@pytest.fixture(scope="module")
def fx():
    """(the npz's statistics arrays and fc.weight as a dict, the JSON's `stats`)."""
    with np.load(EVAL_FIXTURE_A) as z:
        arrays = {k: z[k] for k in z.files if "stat_" in k or "fc.weight" in k}
    stats = json.loads(EVAL_FIXTURE_A.with_suffix(".json").read_text())["stats"]
    return arrays, stats


def _feats(fx, name: str, part: str) -> np.ndarray:
    """Synthetic feature set `name` ('small' / 'pool'), `part` ('ref' / 'sample'): `[N, D]` float32 = q / 32."""
    return fx[0][f"in/stat_{name}_{part}_q"].astype(np.float32) / 32


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------------- statistics


@needs_fixture
@pytest.mark.parametrize("name", SETS)
def test_statistics_match_adm(fx, name):
    arrays, _ = fx
    for part in ("ref", "sample"):
        x = _feats(fx, name, part)
        st = M.feature_statistics(x, batch_size=128)  # 600 / 500 / 300 / 250 rows: blocks that do not divide N
        assert st.num == len(x) and st.mu.dtype == np.float32 and st.sigma.dtype == np.float64
        # the sums of q / 32 are exact in float32, so ADM's float32 mean is the correctly rounded one, as ours is
        np.testing.assert_array_equal(st.mu, arrays[f"out/stat_{name}_mu_{part}"])
        cov = np.cov(x, rowvar=False)
        # measured: <= 1.4e-15 of max |cov| on all four sets (float64 shifted sums vs np.cov's two-pass)
        assert np.abs(st.sigma - cov).max() <= 1e-13 * np.abs(cov).max()
        ref = arrays[f"out/stat_{name}_sigma_{part}"] if name == "small" else arrays[f"out/stat_pool_sigma_{part}_diag"]
        got = st.sigma if name == "small" else np.diagonal(st.sigma)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * np.abs(ref).max())


def test_statistics_blocked_sharded_and_jax_input():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((45, 6)) * [1, 2, 3, 4, 5, 6] + 100).astype(np.float32)  # large mean: shift matters
    mesh = Mesh(np.array(jax.devices()), ("data",))
    for st in (
        M.feature_statistics(x, batch_size=7),
        M.feature_statistics(jnp.asarray(x), batch_size=10, mesh=mesh),
        M.feature_statistics(x.tolist()),
    ):
        assert st.num == 45
        np.testing.assert_allclose(st.mu, x.astype(np.float64).mean(0), rtol=1e-7)
        np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------ FID


@needs_fixture
def test_fid_small_matches_adm(fx):
    res = fx[1]["small"]["results"]
    ref = M.feature_statistics(_feats(fx, "small", "ref"))
    sample = M.feature_statistics(_feats(fx, "small", "sample"))
    assert _rel(M.frechet_distance(sample, ref), res["fid_adm"]) < 1e-6  # measured 2.1e-9
    assert abs(M.frechet_distance(ref, ref)) < 1e-12  # ADM: -1.2e-14


@needs_fixture
def test_fid_pool_rank_deficient_matches_adm(fx):
    res = fx[1]["pool"]["results"]
    ref = M.feature_statistics(_feats(fx, "pool", "ref"))
    sample = M.feature_statistics(_feats(fx, "pool", "sample"))
    with threadpoolctl.threadpool_limits(1):  # the 2048-d sqrtm: 13 s of CPU on one thread, 3x that on two busy cores
        fid = M.frechet_distance(sample, ref)
    assert _rel(fid, res["fid_adm"]) < 1e-5  # measured 5.4e-8


@needs_fixture
@pytest.mark.slow
def test_fid_pool_with_itself_is_near_zero(fx):
    ref = M.feature_statistics(_feats(fx, "pool", "ref"))
    with threadpoolctl.threadpool_limits(1):
        assert abs(M.frechet_distance(ref, ref)) < 1e-3  # sqrtm of a singular matrix: ADM -6.7e-5, ours -6.9e-5


def _fid_symmetric_form(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of equal-mean Gaussians by eigh: tr a + tr b - 2 tr (a^1/2 b a^1/2)^1/2."""
    w, v = np.linalg.eigh(a)
    root = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root @ b @ root)
    return float(np.trace(a) + np.trace(b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_fid_closed_forms():
    rng = np.random.default_rng(2)
    a = np.cov(rng.standard_normal((50, 4)), rowvar=False)
    b = np.cov(rng.standard_normal((50, 4)), rowvar=False)
    mu = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    # sigma a vs 4 a (commuting): tr a + 4 tr a - 2 tr 2a = tr a; |mu difference|^2 = 4
    got = M.frechet_distance(M.FeatureStats(mu, a, 0), M.FeatureStats(mu + 1, 4 * a, 0))
    assert got == pytest.approx(4.0 + np.trace(a), rel=1e-10)
    got = M.frechet_distance(M.FeatureStats(mu, a, 0), M.FeatureStats(mu, b, 0))
    assert got == pytest.approx(_fid_symmetric_form(a, b), rel=1e-10)


def test_fid_complex_sqrtm_raises_and_non_finite_retries(monkeypatch, caplog):
    eye = M.FeatureStats(np.zeros(2), np.eye(2), 0)
    with pytest.raises(ValueError, match="imaginary"):  # s1 s2 = diag(-1, 1): sqrtm is complex on the diagonal
        M.frechet_distance(eye, M.FeatureStats(np.zeros(2), np.diag([-1.0, 1.0]), 0))
    seen = []
    real_sqrtm = M.scipy.linalg.sqrtm

    def flaky_sqrtm(m):
        seen.append(m.copy())
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(M.scipy.linalg, "sqrtm", flaky_sqrtm)
    with caplog.at_level("WARNING", logger=M.__name__):
        got = M.frechet_distance(eye, eye, eps=0.5)
    assert "not finite" in caplog.text
    np.testing.assert_allclose(seen[1], np.eye(2) * 1.5**2)  # eps added to both diagonals
    assert got == pytest.approx(4.0 - 2 * 3.0)  # tr 1 + tr 1 - 2 tr 1.5


# ------------------------------------------------------------------------------------------------------------- IS


@needs_fixture
@pytest.mark.parametrize("part", ["sample", "ref"])
def test_inception_score_matches_adm_and_torch_fidelity(fx, part):
    arrays, stats = fx
    res = stats["pool"]["results"]
    w = arrays["inception_int8/fc.weight"].astype(np.float32) * arrays["inception_scale/fc.weight"]
    logits = _feats(fx, "pool", part) @ w.T  # [N, 1008]: ADM's softmax input (pool @ W, no bias)
    for split in (5000, 100):  # one chunk / 5 or 6 consecutive chunks; measured <= 1.6e-7 relative
        assert _rel(M.inception_score(logits, split_size=split), res[f"is_adm_{part}_split{split}"]) < 1e-5
    mean, std = M.inception_score_shuffled(logits)
    key = f"is_torch_fidelity_{part}_splits10_shuffle2020"
    assert _rel(mean, res[f"{key}_mean"]) < 1e-9 and _rel(std, res[f"{key}_std"]) < 1e-9  # measured <= 8e-16


def _is_numpy(logits: np.ndarray, split: int) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        c = p[i : i + split]
        scores.append(np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0, keepdims=True))), 1))))
    return float(np.mean(scores))


def test_inception_score_chunks_and_shuffled_splits():
    logits = np.random.default_rng(3).standard_normal((30, 11)).astype(np.float32) * 3
    assert M.inception_score(logits, split_size=7) == pytest.approx(_is_numpy(logits.astype(np.float64), 7), rel=1e-5)
    assert M.inception_score(jnp.asarray(logits)) == pytest.approx(_is_numpy(logits.astype(np.float64), 30), rel=1e-5)
    mean, std = M.inception_score_shuffled(logits, splits=3, seed=5)
    perm = np.random.RandomState(5).permutation(30)
    scores = [_is_numpy(logits.astype(np.float64)[perm][i * 10 : (i + 1) * 10], 10) for i in range(3)]
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-10)
    # underflowing probabilities (logit gaps > 104 in float32) count 0, not NaN
    assert np.isfinite(M.inception_score(np.array([[0.0, 500.0], [500.0, 0.0]], np.float32)))
    assert M.inception_score(np.array([[0.0, 500.0], [500.0, 0.0]], np.float32)) == pytest.approx(2.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------- precision/recall


def _pr_numpy(ref: np.ndarray, sample: np.ndarray, k: int = 3):
    """Brute force in float64: radii (element k of each sorted row) and the `<=` decisions."""
    ref, sample = ref.astype(np.float64), sample.astype(np.float64)
    d = lambda u, v: ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d(ref, ref), axis=1)[:, k]
    r_sample = np.sort(d(sample, sample), axis=1)[:, k]
    ds = d(sample, ref)
    return r_ref, r_sample, (ds <= r_ref[None, :]).any(1), (ds <= r_sample[:, None]).any(0)


@needs_fixture
@pytest.mark.parametrize("name", SETS)
def test_precision_recall_is_exact(fx, name):
    arrays, stats = fx
    res = stats[name]["results"]
    ref, sample = _feats(fx, name, "ref"), _feats(fx, name, "sample")
    pr = M.precision_recall(ref, sample, batch_size=128)  # float32; blocks that do not divide N
    assert pr.precision == res["precision_exact_f64"] and pr.recall == res["recall_exact_f64"]
    exact_ref, exact_sample = arrays[f"out/stat_{name}_exact_radii_ref"], arrays[f"out/stat_{name}_exact_radii_sample"]
    # measured: equal to the last bit (q / 32 minus the 3-bit centre keeps every float32 sum exact); on continuous
    # features float32 is within 9e-7 (test below); the closest decision margin is 1.7e-3 / 5.1e-4 of the median radius
    np.testing.assert_allclose(pr.radii_ref, exact_ref, rtol=1e-6)
    np.testing.assert_allclose(pr.radii_sample, exact_sample, rtol=1e-6)
    s64, r64 = sample.astype(np.float64), ref.astype(np.float64)  # multiples of 1/32: this float64 form is exact
    d = (s64 * s64).sum(1)[:, None] + (r64 * r64).sum(1)[None, :] - 2 * s64 @ r64.T
    np.testing.assert_array_equal(pr.sample_in_ref_manifold, (d <= exact_ref[None, :]).any(1))
    np.testing.assert_array_equal(pr.ref_in_sample_manifold, (d <= exact_sample[:, None]).any(0))
    flips = np.sum(pr.sample_in_ref_manifold != arrays[f"out/stat_{name}_adm_sample_in_ref_manifold"].astype(bool))
    flips += np.sum(pr.ref_in_sample_manifold != arrays[f"out/stat_{name}_adm_ref_in_sample_manifold"].astype(bool))
    assert flips == res["pr_decisions_differ_adm_vs_exact"]  # ADM's float16 path: 2 of 550 / 3 of 1100
    same = M.precision_recall(ref, ref, batch_size=128)
    assert same.precision == same.recall == 1.0  # as ADM's reference set with itself


@needs_fixture
def test_precision_recall_float32_on_continuous_features_and_mesh(fx):
    rng = np.random.default_rng(0)  # the pool sets de-quantised: (q + U[0, 1)) / 32, so float32 sums round
    ref = ((fx[0]["in/stat_pool_ref_q"][:300] + rng.random((300, 2048))) / 32).astype(np.float32)
    sample = ((fx[0]["in/stat_pool_sample_q"][:250] + rng.random((250, 2048))) / 32).astype(np.float32)
    pr64 = M.precision_recall(ref, sample, batch_size=128, dtype="float64")
    assert pr64.radii_ref.dtype == np.float64
    exact = [np.sort(((ref.astype(np.float64) - row) ** 2).sum(1))[3] for row in ref[:50].astype(np.float64)]
    np.testing.assert_allclose(pr64.radii_ref[:50], exact, rtol=1e-12)  # measured 2e-15
    mesh = Mesh(np.array(jax.devices()), ("data",))
    pr = M.precision_recall(jnp.asarray(ref), sample, batch_size=123, mesh=mesh)  # 123 -> 128 rows: 8 shards
    np.testing.assert_allclose(pr.radii_ref, pr64.radii_ref, rtol=3e-6)  # measured 5.5e-7
    np.testing.assert_allclose(pr.radii_sample, pr64.radii_sample, rtol=3e-6)  # measured 4.5e-7
    np.testing.assert_array_equal(pr.sample_in_ref_manifold, pr64.sample_in_ref_manifold)
    np.testing.assert_array_equal(pr.ref_in_sample_manifold, pr64.ref_in_sample_manifold)


@pytest.mark.parametrize("integer", [True, False])
def test_precision_recall_matches_brute_force(integer):
    rng = np.random.default_rng(4)
    if integer:  # small integers: every distance is exact and ties are everywhere, so `<=` and index k are tested
        ref, sample = rng.integers(0, 3, (37, 5)).astype(np.float32), rng.integers(0, 3, (29, 5)).astype(np.float32)
    else:
        ref = rng.standard_normal((37, 5)).astype(np.float32)
        sample = (rng.standard_normal((29, 5)) * 1.3 + 0.2).astype(np.float32)
    r_ref, r_sample, s_in, r_in = _pr_numpy(ref, sample)
    pr = M.precision_recall(ref, sample, batch_size=8)  # 8 divides neither 37 nor 29
    tol = dict(rtol=0, atol=0) if integer else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pr.radii_ref, r_ref, **tol)
    np.testing.assert_allclose(pr.radii_sample, r_sample, **tol)
    np.testing.assert_array_equal(pr.sample_in_ref_manifold, s_in)
    np.testing.assert_array_equal(pr.ref_in_sample_manifold, r_in)
    assert pr.precision == s_in.mean() and pr.recall == r_in.mean()
    np.testing.assert_allclose(M.manifold_radii(ref, batch_size=5), r_ref, **tol)
    r1 = np.sort(((ref[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1), axis=1)[:, 1]
    np.testing.assert_allclose(M.manifold_radii(ref, k=1, batch_size=64), r1, **tol)  # nearest other point


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.feature_statistics(np.zeros(5)), "must be 2-D"),
        (lambda: M.feature_statistics(np.zeros((1, 4))), "at least 2 rows"),
        (lambda: M.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]])), "non-finite"),
        (lambda: M.feature_statistics(jnp.array([[0.0, jnp.inf], [1.0, 2.0]])), "non-finite"),
        (lambda: M.precision_recall(np.zeros((3, 4)), np.zeros((9, 4))), "at least 4"),
        (lambda: M.precision_recall(np.zeros((9, 4)), np.zeros((9, 5))), "D=4 but sample features D=5"),
        (lambda: M.precision_recall(np.zeros((9, 4, 1)), np.zeros((9, 4))), "must be 2-D"),
        (lambda: M.precision_recall(np.zeros((9, 4)), np.full((9, 4), np.inf)), "non-finite"),
        (lambda: M.precision_recall(np.zeros((9, 4)), np.zeros((9, 4)), dtype="float16"), "dtype"),
        (lambda: M.manifold_radii(np.zeros((9, 4)), k=0), "k must be"),
        (lambda: M.inception_score(np.zeros(10)), "logits must be 2-D"),
        (lambda: M.inception_score(np.zeros((4, 3)), split_size=0), "split_size"),
        (lambda: M.inception_score_shuffled(np.zeros((4, 3))), "cannot fill 10 splits"),
        (
            lambda: M.frechet_distance(
                M.FeatureStats(np.zeros(3), np.eye(3), 0), M.FeatureStats(np.zeros(4), np.eye(4), 0)
            ),
            "different dimension",
        ),
        (
            lambda: M.frechet_distance(
                M.FeatureStats(np.zeros(3), np.eye(4), 0), M.FeatureStats(np.zeros(3), np.eye(3), 0)
            ),
            "sigma",
        ),
    ],
)
def test_bad_input_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_device_moments_equal_the_host_ones():
    """GPUs accumulate the covariance sums on device (float64 under enable_x64), CPUs / TPUs on the host: same sums.
    The device path runs here on the CPU devices, over a mesh of all 8 and in blocks that do not divide N."""
    x = np.random.default_rng(3).normal(size=(203, 24)).astype(np.float32) * 3 + 1
    shift = x[:64].astype(np.float64).mean(axis=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    s1, s2 = M._device_moments(x, 64, shift, mesh)
    xc = x.astype(np.float64) - shift
    np.testing.assert_allclose(s1, xc.sum(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s2, xc.T @ xc, rtol=1e-12, atol=1e-9)
