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
from jaxgen.models.tokenizers.quantizers import VectorQuantizer
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
)
from jaxgen.train.losses.config import TokenizerLossConfig
from tests.helpers import tiny_var

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


def _vq(l2_norm=False, beta=0.25):
    """A VectorQuantizer with a random codebook, as the VQGAN and TiTok tokenizers build it."""
    vq = VectorQuantizer(codebook_size=7, embed_dim=4, l2_norm=l2_norm, beta=beta)
    params = {"embedding": {"embedding": jnp.asarray(_rand(7, 7, 4))}}
    return vq, params


def test_vector_quantizer_losses_and_straight_through():
    """The loss the quantizer computes is codebook + beta * commitment, mean over every element, with the
    straight-through output: value = the nearest code, gradient passed to z unchanged; the codebook term moves the
    codes only (d/de = 2 (e - z) / N per selected code), the commitment term the encoder only
    (d/dz = 2 beta (z - e) / N)."""
    beta = 0.25
    vq, params = _vq(beta=beta)
    z = jnp.asarray(_rand(4, 2, 3, 3, 4))
    n = z.size
    z_q, loss, idx = vq.apply({"params": params}, z)
    book = np.asarray(params["embedding"]["embedding"], np.float64)
    d = ((np.asarray(z, np.float64)[..., None, :] - book) ** 2).sum(-1).reshape(-1, 7)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), d.argmin(-1))  # the nearest code by squared distance
    e = book[np.asarray(idx).reshape(-1)].reshape(z.shape)
    np.testing.assert_allclose(z_q, e, atol=1e-6)
    np.testing.assert_allclose(loss, (1 + beta) * np.mean((e - np.asarray(z, np.float64)) ** 2), rtol=RTOL)

    w = _rand(6, *z.shape)
    f = lambda q: jnp.sum(w * jnp.sin(q))
    g_z = jax.grad(lambda z_: f(vq.apply({"params": params}, z_)[0]))(z)
    np.testing.assert_allclose(g_z, jax.grad(f)(jnp.asarray(e, jnp.float32)), rtol=1e-5, atol=1e-6)

    g_loss_z = jax.grad(lambda z_: vq.apply({"params": params}, z_)[1])(z)
    np.testing.assert_allclose(g_loss_z, 2 * beta * (np.asarray(z, np.float64) - e) / n, rtol=RTOL, atol=1e-8)
    g_loss_book = jax.grad(lambda p: vq.apply({"params": p}, z)[1])(params)["embedding"]["embedding"]
    want = np.zeros((7, 4))
    np.add.at(want, np.asarray(idx).reshape(-1), (2 * (e - np.asarray(z, np.float64)) / n).reshape(-1, 4))
    np.testing.assert_allclose(g_loss_book, want, rtol=RTOL, atol=1e-8)


def test_l2_normalised_quantizer_works_on_unit_vectors():
    """With l2_norm (LlamaGen's VQ), z and the codes are unit vectors: the output has norm 1 and the loss is that of
    the normalised vectors."""
    vq, params = _vq(l2_norm=True)
    z = jnp.asarray(_rand(4, 2, 3, 3, 4, scale=3.0))
    z_q, loss, idx = vq.apply({"params": params}, z)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z_q), axis=-1), 1.0, atol=1e-5)
    zn = np.asarray(z, np.float64) / np.linalg.norm(np.asarray(z, np.float64), axis=-1, keepdims=True)
    book = np.asarray(params["embedding"]["embedding"], np.float64)
    book = book / np.linalg.norm(book, axis=-1, keepdims=True)
    e = book[np.asarray(idx).reshape(-1)].reshape(z.shape)
    np.testing.assert_allclose(loss, 1.25 * np.mean((e - zn) ** 2), rtol=RTOL)


def test_multi_scale_quantizer_loss_is_the_mean_over_scales():
    """VAR's loss: mean over the scales k of beta |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2, f_hat_k the cumulative
    reconstruction after scale k (what `quantize` returns)."""
    vae, _, vae_params, _ = tiny_var()
    q = vae.config
    f = jnp.asarray(_rand(3, 2, q.patch_nums[-1], q.patch_nums[-1], q.z_channels))
    _, loss, _ = vae.apply({"params": vae_params}, f, method=lambda m, x: m.quantize(x))
    _, f_hats = vae.apply({"params": vae_params}, f, method=lambda m, x: m.quantize.quantize(x))
    f64 = np.asarray(f, np.float64)
    want = np.mean([(1 + q.beta) * np.mean((np.asarray(fh, np.float64) - f64) ** 2) for fh in f_hats])
    np.testing.assert_allclose(loss, want, rtol=1e-5)


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
