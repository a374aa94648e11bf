"""PatchDiscriminator vs a plain-torch PatchGAN (taming's NLayerDiscriminator layout) with the same weights.

Tolerance: both sides are float32 with different conv algorithms (XLA vs oneDNN), so sums of up to 4*4*C_in
products are rounded in different orders, and BatchNorm / GroupNorm divide by batch stds. Measured max |diff|:
logits 7e-7 (batch), 8e-8 (none), 2.6e-6 (group) on logits of magnitude 0.2-1.8; input gradients <= 3e-7 on
gradients up to 0.6. Asserted at atol 1e-5 + rtol 1e-4 (logits) and atol 1e-5 relative to the largest gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from jaxgen.models.discriminators import PatchDiscriminator
from tests.helpers import random_params

ATOL, RTOL = 1e-5, 1e-4


def torch_patchgan(ndf, n_layers, norm):
    """The PatchGAN stack in plain torch (NCHW): convs 4x4 padding 1, LeakyReLU 0.2, BatchNorm2d / GroupNorm(32)."""
    normed = norm != "none"

    def norm_layer(c):
        return tnn.BatchNorm2d(c) if norm == "batch" else tnn.GroupNorm(32, c)

    layers = [tnn.Conv2d(3, ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
    c_in = ndf
    for n in range(1, n_layers + 1):
        c_out = ndf * min(2**n, 8)
        layers.append(tnn.Conv2d(c_in, c_out, 4, 2 if n < n_layers else 1, 1, bias=not normed))
        if normed:
            layers.append(norm_layer(c_out))
        layers.append(tnn.LeakyReLU(0.2))
        c_in = c_out
    layers.append(tnn.Conv2d(c_in, 1, 4, 1, 1))
    return tnn.Sequential(*layers).train()  # BatchNorm2d in train mode: batch statistics


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def copy_weights(params, net, n_layers):
    """Flax params -> the torch net: kernels HWIO -> OIHW; norm scale / bias -> weight / bias."""
    convs = [m for m in net if isinstance(m, tnn.Conv2d)]
    norms = [m for m in net if isinstance(m, (tnn.BatchNorm2d, tnn.GroupNorm))]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            p = params[f"conv_{i}"]
            conv.weight.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))
            if conv.bias is not None:
                conv.bias.copy_(_t(p["bias"]))
        for n, norm in enumerate(norms, start=1):
            norm.weight.copy_(_t(params[f"norm_{n}"]["scale"]))
            norm.bias.copy_(_t(params[f"norm_{n}"]["bias"]))
    assert len(convs) == n_layers + 2


def disc_params(disc, x, seed):
    """Random params of `disc` (`tests.helpers.random_params`: numpy draws, kernels N(0, 1/fan_in) so activations stay
    O(1) through the stack); the discriminator has only params, no batch_stats: a pure function of (params, x)."""
    shapes = jax.eval_shape(disc.init, jax.random.key(0), x)
    assert set(shapes) == {"params"}
    return random_params(shapes["params"], seed)


@pytest.mark.parametrize(
    ("norm", "ndf", "n_layers", "size"),
    [("batch", 8, 3, 32), ("none", 8, 3, 32), ("batch", 8, 2, 16), ("group", 32, 2, 24)],
)
def test_matches_torch_forward_and_input_grad(norm, ndf, n_layers, size):
    disc = PatchDiscriminator(ndf=ndf, n_layers=n_layers, norm=norm)
    x = np.tanh(np.random.default_rng(0).standard_normal((3, size, size, 3))).astype(np.float32)
    params = disc_params(disc, x, 1)
    net = torch_patchgan(ndf, n_layers, norm)
    copy_weights(params, net, n_layers)

    out = jax.jit(disc.apply)({"params": params}, x)
    xt = _t(x).permute(0, 3, 1, 2).requires_grad_(True)
    out_t = net(xt)
    assert out.dtype == jnp.float32 and out.shape == tuple(out_t.permute(0, 2, 3, 1).shape)
    np.testing.assert_allclose(out, out_t.permute(0, 2, 3, 1).detach().numpy(), atol=ATOL, rtol=RTOL)

    # gradient of a random projection of the logits w.r.t. the input image
    w = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    g = jax.jit(jax.grad(lambda x_: jnp.sum(disc.apply({"params": params}, x_) * w)))(x)
    (out_t * _t(w).permute(0, 3, 1, 2)).sum().backward()
    g_t = xt.grad.permute(0, 2, 3, 1).numpy()
    scale = np.abs(g_t).max()
    np.testing.assert_allclose(g / scale, g_t / scale, atol=ATOL)  # relative to the largest input gradient


@pytest.mark.parametrize(("size", "n_layers", "side"), [(16, 2, 2), (32, 2, 6), (32, 3, 2), (24, 3, 1)])
def test_output_shape(size, n_layers, side):
    disc = PatchDiscriminator(ndf=4, n_layers=n_layers, norm="batch")
    x = jnp.zeros((2, size, size, 3))
    out = jax.eval_shape(lambda: disc.init_with_output(jax.random.key(0), x)[0])
    assert out.shape == (2, side, side, 1) and out.dtype == jnp.float32


def test_too_small_input_and_bad_norm():
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(ndf=4, n_layers=3).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="norm must be"):
        PatchDiscriminator(ndf=4, norm="instance").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_init_statistics():
    disc = PatchDiscriminator(ndf=16, n_layers=3, norm="batch")
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(disc.init, jax.random.key(0), x)["params"]
    assert sorted(shapes) == ["conv_0", "conv_1", "conv_2", "conv_3", "conv_4", "norm_1", "norm_2", "norm_3"]
    assert [shapes[f"conv_{i}"]["kernel"].shape[-1] for i in range(5)] == [16, 32, 64, 128, 1]
    assert "bias" not in shapes["conv_1"] and "bias" in shapes["conv_0"] and "bias" in shapes["conv_4"]
    # an "rbg" key: its sampler compiles in seconds where threefry's takes far longer on this CPU
    params = jax.jit(disc.init)(jax.random.key(0, impl="rbg"), x)["params"]
    k = np.asarray(params["conv_3"]["kernel"])  # 4*4*64*128 = 131k draws of N(0, 0.02^2): std within 1%
    assert abs(k.std() - 0.02) < 2e-4 and abs(k.mean()) < 2e-4
    s = np.asarray(params["norm_3"]["scale"])  # 128 draws of N(1, 0.02^2)
    assert abs(s.mean() - 1.0) < 6e-3 and 0.014 < s.std() < 0.026
    assert not np.any(params["norm_3"]["bias"]) and not np.any(params["conv_0"]["bias"])
