"""jaxgen.eval.class_fidelity on real scikit-learn digits: real digits score high, wrong labels and noise low."""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxgen.eval import class_fidelity as cf

NUM_HELD_OUT = 297  # the last 297 digits train the classifier; the other 1500 play "generated" samples


def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as `[N, size, size, 3]` float32 in [-1, 1] (bilinear upsampling) and `[N]` int32 labels."""
    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    x = np.asarray(jax.image.resize(x[..., None], (len(x), size, size, 1), "bilinear"))
    x = np.clip(np.repeat(x, 3, axis=-1), -1.0, 1.0)
    return x, d.target.astype(np.int32)


@pytest.fixture(scope="module")
def data16():
    x, y = _digits(16)
    scorer = cf.fit_classifier(x[-NUM_HELD_OUT:], y[-NUM_HELD_OUT:])
    return scorer, x[:-NUM_HELD_OUT], y[:-NUM_HELD_OUT]


@pytest.mark.parametrize("size", [16, 32])
def test_real_accuracy(size):
    x, y = _digits(size)
    scorer = cf.fit_classifier(x[-NUM_HELD_OUT:], y[-NUM_HELD_OUT:], seed=0)
    assert scorer.classes == tuple(range(10)) and scorer.num_train == NUM_HELD_OUT
    assert scorer.real_accuracy(x[:-NUM_HELD_OUT], y[:-NUM_HELD_OUT]) >= 0.9


def test_deterministic(data16):
    scorer, x, _ = data16
    x_all, y_all = _digits(16)
    again = cf.fit_classifier(x_all[-NUM_HELD_OUT:], y_all[-NUM_HELD_OUT:])
    np.testing.assert_array_equal(scorer.predict(x), again.predict(x))


def test_true_labels_score_high_wrong_labels_low(data16):
    scorer, x, y = data16
    good = scorer.score(x, y)
    assert good["class_fidelity"] >= 0.9 and good["num_samples"] == len(x) and good["num_nonfinite"] == 0
    assert good["class_fidelity"] == pytest.approx(scorer.real_accuracy(x, y))
    assert scorer.score(x, (y + 1) % 10)["class_fidelity"] <= 0.2
    shuffled = np.random.default_rng(0).permutation(y)
    assert scorer.score(x, shuffled)["class_fidelity"] <= 0.2


def test_noise_is_near_chance(data16):
    scorer, x, y = data16
    noise = np.random.default_rng(1).uniform(-1.0, 1.0, x.shape).astype(np.float32)
    assert scorer.score(noise, y)["class_fidelity"] < 0.35


def test_nonfinite_samples_count_as_wrong(data16):
    scorer, x, y = data16
    x, y = x[:100].copy(), y[:100]
    base = scorer.score(x, y)
    x[:10, 3, 4, 0] = np.nan
    x[10:20, 0, 0, 2] = np.inf
    x[20:30] = -np.inf
    got = scorer.score(x, y)
    assert got["num_nonfinite"] == 30 and got["num_samples"] == 100
    correct_rest = np.mean(scorer.predict(x[30:]) == y[30:])
    assert got["class_fidelity"] == pytest.approx(correct_rest * 70 / 100)
    assert got["class_fidelity"] < base["class_fidelity"]
    all_nan = scorer.score(np.full_like(x, np.nan), y)
    assert all_nan["class_fidelity"] == 0.0 and all(v == 0.0 for v in all_nan["class_fidelity_per_class"].values())


def test_per_class_dict_skips_empty_classes(data16):
    scorer, x, y = data16
    keep = np.isin(y, [0, 3, 7])
    got = scorer.score(x[keep], y[keep])
    assert set(got["class_fidelity_per_class"]) == {"0", "3", "7"}
    pred = scorer.predict(x[keep])
    for c in (0, 3, 7):  # each class's entry is the share of its samples the classifier calls that class
        assert got["class_fidelity_per_class"][str(c)] == pytest.approx(np.mean(pred[y[keep] == c] == c))
    counts = np.array([np.sum(y[keep] == c) for c in (0, 3, 7)])
    fractions = np.array([got["class_fidelity_per_class"][k] for k in ("0", "3", "7")])
    assert got["class_fidelity"] == pytest.approx(float(counts @ fractions / counts.sum()))
    full = scorer.score(x, y)["class_fidelity_per_class"]
    assert list(full) == [str(c) for c in range(10)] and min(full.values()) >= 0.7


def test_overshooting_samples_are_clipped_not_rejected(data16):
    scorer, x, y = data16
    assert scorer.score(x[:200] * 1.2, y[:200])["class_fidelity"] >= 0.85
    assert scorer.score(x[:200, ..., :1], y[:200])["num_samples"] == 200  # one channel is accepted too


def test_pooling_undoes_nearest_upsampling():
    rng = np.random.default_rng(0)
    small = rng.uniform(-1.0, 1.0, (4, 8, 8)).astype(np.float32)
    for k in (2, 4):
        big = np.repeat(np.repeat(small, k, axis=1), k, axis=2)[..., None].repeat(3, axis=-1)
        np.testing.assert_allclose(cf.pooled_features(big), small.reshape(4, 64), atol=1e-6)
    odd = cf.pooled_features(rng.uniform(-1.0, 1.0, (2, 13, 20, 3)).astype(np.float32))
    assert odd.shape == (2, 64) and np.all(np.abs(odd) <= 1.0)


def test_errors(data16):
    scorer, x, y = data16
    with pytest.raises(ValueError, match="4-D"):
        scorer.score(x[0], y[:1])
    with pytest.raises(ValueError, match="4-D"):
        cf.fit_classifier(x[..., 0], y)
    with pytest.raises(ValueError, match="channels"):
        scorer.score(x[..., :2], y)
    with pytest.raises(ValueError, match="entries"):
        scorer.score(x[:10], y[:9])
    with pytest.raises(ValueError, match="1-D"):
        scorer.score(x[:10], y[:10, None])
    with pytest.raises(ValueError, match="not fitted"):
        scorer.score(x[:3], np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="not fitted"):
        scorer.real_accuracy(x[:3], np.array([-1, 1, 2]))
    with pytest.raises(ValueError, match="integers"):
        scorer.score(x[:3], np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="dtype uint8"):
        scorer.score(((x[:3] + 1) * 127.5).astype(np.uint8), y[:3])
    with pytest.raises(ValueError, match="at least one"):
        scorer.score(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        cf.fit_classifier((x[:50] + 1) * 127.5, y[:50])
    with pytest.raises(ValueError, match="NaN"):
        scorer.real_accuracy(np.full_like(x[:3], np.nan), y[:3])
    with pytest.raises(ValueError, match="2 classes"):
        cf.fit_classifier(x[:5], np.zeros(5, np.int32))
