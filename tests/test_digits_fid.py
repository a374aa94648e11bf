"""The digits FID (`jaxgen.eval.digits_fid`): real digits score near the floor and corrupted ones far above it, a fit
is deterministic, bad input is a clear error; the eval section's config checks; the training-time eval callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxgen import data as data_lib
from jaxgen.config_util import load_config
from jaxgen.eval.digits_fid import FEATURE_DIM, DigitsFID, matched_subset
from jaxgen.train.sections import digits_data_section

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    cfg = digits_data_section()
    return data_lib.load_eval_arrays(cfg, "train"), data_lib.load_eval_arrays(cfg, "test")


@pytest.fixture(scope="module")
def fitted(digits):
    train, held = digits
    fid = DigitsFID.fit(train["image"], train["label"], seed=0)
    return fid, fid.reference(held["image"])


def test_real_digits_score_near_the_floor_and_noise_far_above(digits, fitted):
    """Measured (seed 0, 16 px; `python -m jaxgen.eval.digits_fid`): held-out accuracy 0.976; 200 class-matched train
    images vs the held-out split 1.72 +- 0.21 (the floor, 10 draws); 200 uniform-noise images 504 (~290x the floor);
    153 train images of one class 280 (~160x). The bounds below leave a wide margin."""
    train, held = digits
    fid, ref = fitted
    assert fid.accuracy(held["image"], held["label"]) >= 0.95
    balanced = np.arange(200) % 10
    floor = fid.real_floor(train["image"], train["label"], balanced, ref, seed=0)
    noise = fid.distance(np.random.default_rng(0).uniform(-1, 1, (200, 16, 16, 3)), ref)
    one_class = fid.distance(train["image"][train["label"] == 3][:200], ref)
    assert 0 < floor < 5
    assert noise > 50 * floor and one_class > 20 * floor, (floor, noise, one_class)
    assert fid.distance(train["image"], ref) < floor  # more samples: less covariance noise
    assert fid.features(held["image"][:7]).shape == (7, FEATURE_DIM)


def test_fit_is_deterministic(digits):
    train, held = digits
    x, y = train["image"][:300], train["label"][:300]  # a subset: three fits stay quick
    a, b = DigitsFID.fit(x, y, seed=1), DigitsFID.fit(x, y, seed=1)
    np.testing.assert_array_equal(a.features(held["image"]), b.features(held["image"]))
    assert a.distance(x[:100], a.reference(held["image"])) == b.distance(x[:100], b.reference(held["image"]))
    other = DigitsFID.fit(x, y, seed=2)
    assert not np.array_equal(other.features(held["image"]), a.features(held["image"]))


def test_bad_input_is_a_clear_error(digits, fitted):
    train, held = digits
    fid, ref = fitted
    x, y = train["image"], train["label"]
    with pytest.raises(ValueError, match="at least 2 classes"):
        DigitsFID.fit(x[y == 1], y[y == 1])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        DigitsFID.fit(x * 2, y)
    with pytest.raises(ValueError, match="has 10 entries but there are 20 images"):
        DigitsFID.fit(x[:20], y[:10])
    with pytest.raises(ValueError, match="reference needs at least 2 images"):
        fid.reference(held["image"][:1])
    with pytest.raises(ValueError, match="distance needs at least 2 samples"):
        fid.distance(x[:1], ref)
    with pytest.raises(ValueError, match="must be 4-D"):
        fid.distance(x[:4, :, :, 0], ref)
    small = DigitsFID.fit(x[:40], y[:40])  # another feature layer would not fit
    bad_ref = type(ref)(mu=ref.mu[:3], sigma=ref.sigma[:3, :3], num=ref.num)
    with pytest.raises(ValueError, match=r"ref has \(3,\) features"):
        small.distance(x[:4], bad_ref)
    with pytest.raises(ValueError, match="class 11 is wanted 2 times"):
        matched_subset(y, [11, 11])
    nan = x[:10].copy()
    nan[3, 0, 0, 0] = np.nan
    assert np.isnan(fid.distance(nan, ref))
    assert np.isfinite(fid.distance(np.clip(x[:50] * 1.05, -2, 2), ref))  # overshoot is clipped, not an error


def test_matched_subset_has_the_wanted_class_counts():
    labels = np.array([0, 0, 0, 1, 1, 2])
    idx = matched_subset(labels, [2, 0, 0, 1, 2, 2, 2], seed=3)
    assert labels[idx].tolist() == [2, 0, 0, 1, 2, 2, 2]
    assert len(set(idx[labels[idx] == 0].tolist())) == 2  # without replacement where the class has enough
    np.testing.assert_array_equal(idx, matched_subset(labels, [2, 0, 0, 1, 2, 2, 2], seed=3))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("every", -1, r"^eval\.every=-1: must be an integer >= 0"),
        ("fid_samples", 1, r"^eval\.fid_samples=1: must be an integer >= 2 when eval\.every=10 > 0"),
        ("sample_batches", -2, r"^eval\.sample_batches=-2: must be an integer >= 0"),
        ("inception_fid_images", 1, r"^eval\.inception_fid_images=1: must be 0 \(off\) or an integer >= 2"),
    ],
)
def test_eval_section_checks(field, value, match):
    from jaxgen.train.checks import check_eval_section

    section = dict(load_config(str(REPO / "configs/digits_var.py:smoke")).eval)  # a ConfigDict would refuse "yes"
    check_eval_section(section)
    with pytest.raises(ValueError, match=match) as err:
        check_eval_section(section | {field: value})
    assert "\n" not in str(err.value)


def test_check_config_runs_the_eval_checks():
    from jaxgen.train.checks import check_config

    cfg = load_config(str(REPO / "configs/digits_var.py:smoke"))
    cfg.eval.every = -1
    with pytest.raises(ValueError, match=r"eval\.every=-1"):
        check_config(cfg)
    cfg.eval.update(every=0, fid_samples=0)  # off: fid_samples is not read
    check_config(cfg)


def test_fid_callback_rows(digits, fitted):
    """The training-time eval: fid_samples rounded up to whole grid batches of class-balanced labels, sampled with
    the given params, scored and written as one `generator_eval` row (real digits stand in for the sampler)."""
    from jaxgen.eval.class_fidelity import fit_classifier
    from jaxgen.train.loop import _digits_fid_callback, _RealDigits

    train, held = digits
    cfg = load_config(str(REPO / "configs/digits_var.py:smoke"))
    cfg.eval.fid_samples = 30  # grid batch 20 -> 2 batches, 40 samples
    calls, rows = [], []

    def sampler(gen_params, tok_params, labels, key):
        calls.append((gen_params, labels.copy()))
        idx = matched_subset(train["label"], labels, seed=len(calls))
        return type("Out", (), {"images": (train["image"][idx] + 1.0) / 2.0})()

    class Writer:
        def write(self, step, metrics, stage=""):
            rows.append((step, stage, metrics))

    fid, ref = fitted
    real = _RealDigits(train, held, fit_classifier(held["image"], held["label"]), fid, ref, seed=0)
    evaluate = _digits_fid_callback(cfg, sampler, None, 20, real, Writer())
    evaluate("params", 7)
    assert [p for p, _ in calls] == ["params", "params"]
    assert np.bincount(np.concatenate([y for _, y in calls])).tolist() == [4] * 10
    ((step, stage, row),) = rows
    assert (step, stage, row["num_samples"]) == (7, "generator_eval", 40)
    assert row["class_fidelity"] >= 0.9
    assert 0 < row["digits_fid"] < 3 * row["digits_fid_real_floor"], row  # real digits: about the floor


def test_inception_fid_feeds_uint8_rgb_and_is_none_without_weights(monkeypatch):
    """`_inception_fid`: [0, 1] floats -> np.clip(np.round(x * 255), 0, 255) uint8, grey repeated to RGB, pool
    features -> FID of the samples and of the real floor set against the reference (a stand-in extractor here whose
    pool features are the channel means: the real network is tested in test_eval_inception); None without weights."""
    from jaxgen.eval import inception
    from jaxgen.train.loop import _inception_fid

    seen = []

    class ChannelMeans:
        def features(self, u8):
            seen.append(u8)
            return {"pool": u8.reshape(len(u8), -1, 3).mean(axis=1).astype(np.float32)}

    rng = np.random.default_rng(0)
    a, ref, floor = rng.uniform(0, 1, (12, 4, 4, 1)), rng.uniform(0, 1, (9, 4, 4, 3)), rng.uniform(0, 1, (12, 4, 4, 3))
    monkeypatch.setattr(inception, "default_extractor", lambda: ChannelMeans())
    out = _inception_fid(a, ref, floor)
    assert [x.dtype for x in seen] == [np.uint8] * 3
    assert [x.shape for x in seen] == [(9, 4, 4, 3), (12, 4, 4, 3), (12, 4, 4, 3)]
    np.testing.assert_array_equal(seen[1][..., 2], np.round(a[..., 0] * 255).astype(np.uint8))
    assert out["fid_inception_images"] == 12 and np.isfinite(out["fid_inception"]) and out["fid_inception"] > 0
    assert out["fid_inception_real_floor"] > 0
    assert np.isnan(_inception_fid(np.full((2, 4, 4, 3), np.nan), ref, floor)["fid_inception"])
    monkeypatch.setattr(inception, "default_extractor", lambda: None)
    assert _inception_fid(a, ref, floor) is None
