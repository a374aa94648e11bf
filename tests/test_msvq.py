"""Multi-scale residual VQVAE: shapes, the quantizer's invariants, teacher-forcing input, gradients, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.families.base import config_from_dict
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.quantizers import phi_schedule
from tests.helpers import tiny_var


def _apply(vae, params, *args, method):
    return vae.apply({"params": params}, *args, method=method)


@pytest.fixture(scope="module")
def model():
    vae, _, vae_params, _ = tiny_var(patch_nums=(1, 2, 4, 6))
    img = jnp.tanh(jax.random.normal(jax.random.key(0), (3, 12, 12, 3)))
    return vae, vae_params, img


def test_phi_schedule_matches_the_released_models():
    assert phi_schedule(4, 10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_schedule(4, 4) == (0, 1, 2, 3)
    assert phi_schedule(1, 5) == (0,) * 5
    assert phi_schedule(5, 5) == (0, 1, 2, 3, 4)  # one Phi per scale


def test_quantize_shapes_and_fhat_rebuilt_from_indices(model):
    vae, params, img = model
    f = _apply(vae, params, img, method=MultiScaleVQVAE.encode)
    assert f.shape == (3, 6, 6, 8)
    idx, f_hats = _apply(vae, params, f, method=lambda m, x: m.quantize.quantize(x))
    assert [i.shape for i in idx] == [(3, 1), (3, 4), (3, 16), (3, 36)]
    assert all(i.dtype == jnp.int32 and 0 <= int(i.min()) and int(i.max()) < 32 for i in idx)
    rebuilt = _apply(vae, params, idx, method=lambda m, i: m.quantize.indices_to_fhat(i))
    np.testing.assert_allclose(rebuilt, f_hats[-1], atol=1e-5)
    # Scale 0 picks the code nearest to the spatial mean of f (area-resize to 1x1), by brute force in numpy.
    codebook = np.asarray(params["quantize"]["embedding"]["embedding"])
    z0 = np.asarray(f).mean(axis=(1, 2))
    nearest = np.argmin(((z0[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(idx[0][:, 0], nearest)


def test_teacher_forcing_input_equals_the_sampling_path(model):
    """The training input for scale k+1 is what the sampler feeds after drawing scales 0..k."""
    vae, params, img = model
    idx = _apply(vae, params, img, method=MultiScaleVQVAE.img_to_indices)
    x_tf = _apply(vae, params, idx, method=MultiScaleVQVAE.teacher_forcing_input)
    assert x_tf.shape == (3, 4 + 16 + 36, 8)
    f_hat, pieces = jnp.zeros((3, 6, 6, 8)), []
    for si, i in enumerate(idx):
        codes = _apply(vae, params, i, method=lambda m, j: m.quantize.codes(j))
        f_hat, nxt = _apply(vae, params, si, f_hat, codes, method=MultiScaleVQVAE.next_autoregressive_input)
        if si < 3:
            pieces.append(nxt.reshape(3, -1, 8))
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), x_tf, atol=1e-5)


def test_training_forward_loss_and_straight_through_gradients(model):
    vae, params, img = model

    def loss_fn(p):
        rec, vq_loss, _ = vae.apply({"params": p}, img)
        return jnp.mean((rec - img) ** 2) + vq_loss, vq_loss

    (loss, vq_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(vq_loss) > 0
    norm = lambda t: float(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(t)))
    assert norm(grads["encoder"]) > 0  # reconstruction gradient passes the quantizer (straight-through)
    assert norm(grads["quantize"]["embedding"]) > 0  # codebook learns from the VQ loss
    assert norm(grads["quantize"]["phi_0"]) > 0

    # The VQ loss is VAR's: mean over scales of (1 + beta) * |f_hat_k - f|^2 in value.
    f = _apply(vae, params, img, method=MultiScaleVQVAE.encode)
    _, f_hats = _apply(vae, params, f, method=lambda m, x: m.quantize.quantize(x))
    expected = np.mean([(1 + vae.config.beta) * float(jnp.mean((fh - f) ** 2)) for fh in f_hats])
    np.testing.assert_allclose(float(vq_loss), expected, rtol=1e-5)


def test_wrong_image_size_is_a_clear_error(model):
    vae, params, _ = model
    with pytest.raises(ValueError, match=r"expects images \[B, 12, 12, 3\].*got \(2, 16, 16, 3\)"):
        _apply(vae, params, jnp.zeros((2, 16, 16, 3)), method=MultiScaleVQVAE.img_to_indices)


def test_wrong_number_of_token_maps_is_a_clear_error(model):
    vae, params, _ = model
    with pytest.raises(ValueError, match="token maps per scale"):
        _apply(
            vae,
            params,
            [jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 9), jnp.int32)],
            method=MultiScaleVQVAE.indices_to_img,
        )


def test_config_rejects_channel_counts_groupnorm_cannot_take():
    with pytest.raises(ValueError, match="multiple of 32"):
        MSVQConfig(ch=16)
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(MSVQConfig, {"vocab": 3})
