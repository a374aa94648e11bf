"""Training losses and image metrics vs plain numpy formulas (float64) and scikit-image.

Tolerances: the jnp code runs in float32 while the references run in float64, so values on O(1) random inputs are
compared at rtol 1e-5 / atol 1e-6 (a few float32 ulps of accumulated rounding over a few thousand terms) unless a
test says otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from jaxgen.eval.image_metrics import psnr, ssim
from jaxgen.train.losses import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    disc_factor,
    entropy_loss,
    hinge_d_loss,
    hinge_g_loss,
    l1_loss,
    l2_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    vq_losses,
)
from jaxgen.train.losses.config import TokenizerLossConfig

RTOL, ATOL = 1e-5, 1e-6


def _rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_reconstruction_losses_match_numpy():
    x, y = _rand(0, 2, 8, 8, 3), _rand(1, 2, 8, 8, 3)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    np.testing.assert_allclose(l1_loss(x, y), np.mean(np.abs(x64 - y64)), rtol=RTOL)
    np.testing.assert_allclose(l2_loss(x, y), np.mean((x64 - y64) ** 2), rtol=RTOL)
    assert l1_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)).dtype == jnp.float32


def test_adversarial_losses_match_numpy():
    # logits wide enough (std 3) to hit both sides of the hinges and the softplus tails
    real, fake = _rand(2, 4, 6, 6, 1, scale=3.0), _rand(3, 4, 6, 6, 1, scale=3.0)
    r, f = real.astype(np.float64), fake.astype(np.float64)
    hinge_d = 0.5 * (np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)))
    ns_d = 0.5 * (np.mean(_softplus(-r)) + np.mean(_softplus(f)))
    # the non-saturating D loss is the BCE of sigmoid(logits) against real = 1, fake = 0
    bce = 0.5 * (np.mean(-np.log(1 / (1 + np.exp(-r)))) + np.mean(-np.log(1 - 1 / (1 + np.exp(-f)))))
    np.testing.assert_allclose(ns_d, bce, rtol=1e-10)
    np.testing.assert_allclose(hinge_d_loss(real, fake), hinge_d, rtol=RTOL)
    np.testing.assert_allclose(non_saturating_d_loss(real, fake), ns_d, rtol=RTOL)
    np.testing.assert_allclose(hinge_g_loss(fake), -np.mean(f), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(non_saturating_g_loss(fake), np.mean(_softplus(-f)), rtol=RTOL)
    # Each name a config may give (tokenizer_loss.disc_loss / gen_loss) is accepted and selects its formula.
    want_d = {"hinge": hinge_d, "non_saturating": ns_d}
    want_g = {"hinge": -np.mean(f), "non_saturating": np.mean(_softplus(-f))}
    assert set(D_LOSSES) == set(want_d) and set(G_LOSSES) == set(want_g)
    for name in want_d:
        TokenizerLossConfig(disc_loss=name, gen_loss=name)
        np.testing.assert_allclose(D_LOSSES[name](real, fake), want_d[name], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(G_LOSSES[name](fake), want_g[name], rtol=RTOL, atol=ATOL, err_msg=name)
    with pytest.raises(ValueError, match=r"tokenizer_loss\.disc_loss='wgan'.*'hinge', 'non_saturating'"):
        TokenizerLossConfig(disc_loss="wgan")
    # extreme logits stay exact (no log(sigmoid) underflow to -inf): softplus(1e4) = 1e4, softplus(-1e4) = 0, so
    # both losses are 0.5 * 1e4 averaged over the pair = 5000
    big = np.array([-1e4, 1e4], np.float32)
    np.testing.assert_allclose(non_saturating_d_loss(big, big), 5000.0, rtol=1e-6)
    np.testing.assert_allclose(non_saturating_g_loss(big), 5000.0, rtol=1e-6)


def test_adaptive_weight_hand_computed_and_clipped():
    # ||(3, 4)|| = 5 over a pytree split in two leaves; ||(0, 2)|| = 2  ->  5 / (2 + 1e-4)
    nll = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    g = {"a": jnp.array([0.0]), "b": jnp.array([[2.0]])}
    np.testing.assert_allclose(adaptive_weight(nll, g), 5.0 / 2.0001, rtol=1e-6)
    np.testing.assert_allclose(adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]), eps=0.0), 2.5)
    # zero generator grad -> 5 / 1e-4 = 5e4, clipped to max_weight
    np.testing.assert_allclose(adaptive_weight(nll, jax.tree.map(jnp.zeros_like, g)), 1e4)
    np.testing.assert_allclose(adaptive_weight(nll, g, max_weight=2.0), 2.0)
    # the weight is a constant for the update
    grad = jax.grad(lambda s: adaptive_weight(s * jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0])))(1.0)
    assert grad == 0.0


def test_disc_factor_around_start():
    steps = jnp.arange(8, 13)
    np.testing.assert_array_equal(disc_factor(steps, 10), [0, 0, 1, 1, 1])
    assert disc_factor(10, 10).dtype == jnp.float32
    assert float(disc_factor(9, 10)) == 0.0 and float(disc_factor(0, 0)) == 1.0
    jitted = jax.jit(disc_factor)
    assert [float(jitted(s, 10)) for s in (9, 10, 11)] == [0.0, 1.0, 1.0]


def test_vq_losses_values_and_straight_through():
    z, e = _rand(4, 2, 3, 3, 4), _rand(5, 2, 3, 3, 4)
    n, beta = z.size, 0.25
    z_q, cb, commit = vq_losses(z, e, beta)
    d2 = np.mean((e.astype(np.float64) - z) ** 2)
    np.testing.assert_allclose(z_q, e, atol=1e-6)  # z + (e - z) rounds to within an ulp of e
    np.testing.assert_allclose(cb, d2, rtol=RTOL)
    np.testing.assert_allclose(commit, beta * d2, rtol=RTOL)

    # straight-through: d f(z_q_st) / dz equals f'(e), i.e. the gradient passes through unchanged
    w = _rand(6, *z.shape)
    f = lambda q: jnp.sum(w * jnp.sin(q))
    g_z = jax.grad(lambda z_: f(vq_losses(z_, e, beta)[0]))(z)
    np.testing.assert_allclose(g_z, jax.grad(f)(e), rtol=1e-6, atol=1e-7)
    assert not np.any(jax.grad(lambda e_: f(vq_losses(z, e_, beta)[0]))(e))  # no gradient to the codes

    # codebook loss moves the codes only: d/de = 2 (e - z) / N, d/dz = 0
    g_cb_z, g_cb_e = jax.grad(lambda z_, e_: vq_losses(z_, e_, beta)[1], argnums=(0, 1))(z, e)
    np.testing.assert_allclose(g_cb_e, 2 * (e.astype(np.float64) - z) / n, rtol=RTOL, atol=1e-8)
    assert not np.any(g_cb_z)
    # commitment loss moves the encoder only: d/dz = 2 beta (z - e) / N, d/de = 0
    g_c_z, g_c_e = jax.grad(lambda z_, e_: vq_losses(z_, e_, beta)[2], argnums=(0, 1))(z, e)
    np.testing.assert_allclose(g_c_z, 2 * beta * (z.astype(np.float64) - e) / n, rtol=RTOL, atol=1e-8)
    assert not np.any(g_c_e)


def _entropy_reference(logits, temperature):
    x = logits.reshape(-1, logits.shape[-1]).astype(np.float64) / temperature
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    per_sample = np.mean(-np.sum(p * np.log(p), -1))
    avg = p.mean(0)
    return per_sample, -np.sum(avg * np.log(avg))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_entropy_loss_matches_numpy(temperature):
    logits = _rand(7, 2, 5, 5, 16, scale=2.0)
    loss, aux = entropy_loss(logits, temperature)
    per_sample, batch = _entropy_reference(logits, temperature)
    np.testing.assert_allclose(aux["per_sample_entropy"], per_sample, rtol=RTOL)
    np.testing.assert_allclose(aux["batch_entropy"], batch, rtol=RTOL)
    # a difference of two O(log V) terms: absolute tolerance of a few ulps of log V
    np.testing.assert_allclose(loss, per_sample - batch, atol=2e-6)


def test_entropy_loss_limits():
    v = 8
    _, aux = entropy_loss(jnp.zeros((3, 4, v)))  # uniform logits
    np.testing.assert_allclose(aux["per_sample_entropy"], np.log(v), rtol=1e-6)
    np.testing.assert_allclose(aux["batch_entropy"], np.log(v), rtol=1e-6)
    # N = 5 positions, each confidently on a distinct code: per-sample ~ 0, batch = log N
    n = 5
    logits = jnp.asarray(np.eye(n, v, dtype=np.float32) * 100.0)
    loss, aux = entropy_loss(logits)
    assert float(aux["per_sample_entropy"]) < 1e-30  # (V-1) e^-100 * 100 terms, ~1e-40
    np.testing.assert_allclose(aux["batch_entropy"], np.log(n), rtol=1e-6)
    np.testing.assert_allclose(loss, -np.log(n), rtol=1e-6)
    # far more confident logits (e^-1e4 underflows to 0): the same values, and a zero (not NaN) gradient, as the
    # saturated softmax no longer moves
    loss, aux = entropy_loss(logits * 100.0)
    np.testing.assert_allclose([aux["per_sample_entropy"], loss], [0.0, -np.log(n)], rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda x: entropy_loss(x)[0])(logits * 100.0)
    assert np.all(np.isfinite(g)) and np.abs(g).max() < 1e-12


def _images(seed, b=3, h=24, w=20, c=3):
    """Random images in [-1, 1] and noisy copies of them (clipped)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (b, h, w, c)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    return x, y


def _structured(b=3, h=32, w=27):
    """Smooth images (gradients, sinusoids, a square) and blurred / shifted / contrast-changed versions."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    ramp = np.stack([xx, yy, 0.5 * (xx + yy)], -1)
    waves = np.stack([np.sin(4 * xx), np.cos(3 * yy), np.sin(5 * xx * yy)], -1)
    square = np.zeros((h, w, 3)) - 0.8
    square[8:20, 6:18] = 0.9
    x = np.stack([ramp, waves, square])[:b]
    y = np.stack([0.5 * ramp + 0.1, np.roll(waves, 2, axis=1), 0.7 * square])[:b]
    return x.astype(np.float32), y.astype(np.float32)


def test_psnr_matches_numpy():
    x, y = _images(8)
    mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
    got = psnr(x, y)
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, 10 * np.log10(4.0 / mse), rtol=1e-6)
    np.testing.assert_allclose(psnr(x, y, data_range=1.0), 10 * np.log10(1.0 / mse), rtol=1e-6)
    assert np.isinf(psnr(x, x)).all()


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage(kind):
    x, y = _images(9) if kind == "random" else _structured()
    want = [
        structural_similarity(
            a.astype(np.float64),
            b.astype(np.float64),
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
        )
        for a, b in zip(x, y, strict=True)
    ]
    got = ssim(x, y)
    assert got.shape == (3,) and got.dtype == jnp.float32
    # float32 E[x^2] - E[x]^2 vs skimage's float64: rtol 1e-4 (measured <= ~1e-6 relative)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-5)


def test_ssim_rejects_small_images():
    x = np.zeros((1, 10, 16, 3), np.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    assert ssim(np.zeros((1, 11, 11, 3)), np.zeros((1, 11, 11, 3))).shape == (1,)
