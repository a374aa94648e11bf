"""PatchGAN discriminator (pix2pix's / taming-transformers' `NLayerDiscriminator`), NHWC.

Layout, with every conv 4x4 and padding 1 (C_n = ndf * min(2^n, 8)):

  conv_0  stride 2, ndf channels, bias                    -> LeakyReLU(0.2)
  conv_n  stride 2, C_n channels, n = 1..n_layers-1       -> norm_n -> LeakyReLU(0.2)
  conv_L  stride 1, C_L channels, L = n_layers            -> norm_L -> LeakyReLU(0.2)
  conv_{L+1}  stride 1, 1 channel, bias                   -> logits

Each of the n_layers normed convs has no bias (the norm's shift takes its place) unless `norm="none"`, where they
keep one. An `[B, H, W, 3]` image gives `[B, H / 2^n_layers - 2, W / 2^n_layers - 2, 1]` logits for H, W multiples
of 2^n_layers (30x30 for 256 px and n_layers 3): one real / fake logit per overlapping patch.

`norm="batch"` is train-mode BatchNorm: it always normalises with the current batch's mean and biased variance over
(B, H, W), eps 1e-5, with an affine scale / bias, and keeps NO running averages (no `batch_stats` collection, nothing
mutable). The discriminator is only ever used in training, so it stays a pure function of (params, images).
`norm="group"` is GroupNorm with 32 groups (eps 1e-5, channels must be multiples of 32, i.e. ndf % 32 == 0).

Init (taming's `weights_init`): conv kernels N(0, 0.02^2), norm scales N(1, 0.02^2), biases 0 (taming leaves the conv
biases at torch's default uniform init; here they start at 0). Logical axes: kernels ('conv_h', 'conv_w',
'conv_in', 'conv_out'), conv biases ('conv_out',), norm scale / bias ('norm',).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxgen.parallel.logical import logical

BN_EPS = 1e-5
GN_EPS = 1e-5
NUM_GROUPS = 32
NEGATIVE_SLOPE = 0.2


def _normal_around_one(stddev: float):
    def init(key, shape, dtype=jnp.float32):
        return 1.0 + stddev * jax.random.normal(key, shape, dtype)

    return init


_SCALE_INIT = logical(_normal_around_one(0.02), ("norm",))
_NORM_BIAS_INIT = logical(nn.initializers.zeros_init(), ("norm",))


def _out_size(size: int, n_layers: int) -> int:
    """Logit-map side for an input side: each stride-2 conv (k4, p1) floors a half, each stride-1 one takes 1 off."""
    for _ in range(n_layers):
        size //= 2
    return size - 2


class BatchStatNorm(nn.Module):
    """Train-mode BatchNorm without running averages: (x - mean) / sqrt(var + eps) * scale + bias, with the mean and
    biased variance of the current batch over every axis but the last. `[..., C]` -> `[..., C]` float32."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _SCALE_INIT, (c,), jnp.float32)
        bias = self.param("bias", _NORM_BIAS_INIT, (c,), jnp.float32)
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)  # two-pass, biased (what torch normalises with)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: `[B, H, W, 3]` images in [-1, 1] -> `[B, h, w, 1]` float32 logits (see module doc)."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"  # "batch" | "group" | "none"
    dtype: Any = "float32"  # compute dtype of the convs; norms and the logits are float32

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.float32,
            kernel_init=logical(nn.initializers.normal(0.02), ("conv_h", "conv_w", "conv_in", "conv_out")),
            bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)),
            name=name,
        )

    def _norm(self, name: str) -> nn.Module:
        if self.norm == "batch":
            return BatchStatNorm(name=name)
        return nn.GroupNorm(
            num_groups=NUM_GROUPS,
            epsilon=GN_EPS,
            use_fast_variance=False,
            dtype=jnp.float32,
            scale_init=_SCALE_INIT,
            bias_init=_NORM_BIAS_INIT,
            name=name,
        )

    @nn.compact
    def __call__(self, x_bhwc: Float[Array, "B H W 3"]) -> Float[Array, "B h w 1"]:
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"PatchDiscriminator: norm must be 'batch', 'group' or 'none', got {self.norm!r}")
        if self.n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        out_hw = [_out_size(d, self.n_layers) for d in x_bhwc.shape[1:3]]
        if min(out_hw) < 1:
            raise ValueError(
                f"PatchDiscriminator: a {x_bhwc.shape[1]}x{x_bhwc.shape[2]} input is too small for n_layers="
                f"{self.n_layers} (it would give {out_hw[0]}x{out_hw[1]} logits); it needs at least "
                f"{3 * 2**self.n_layers} px a side"
            )
        normed = self.norm != "none"
        dtype = jnp.dtype(self.dtype)
        h = self._conv(self.ndf, 2, True, "conv_0")(x_bhwc.astype(dtype))
        h = nn.leaky_relu(h, NEGATIVE_SLOPE)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2**n, 8), stride, not normed, f"conv_{n}")(h)
            if normed:
                h = self._norm(f"norm_{n}")(h).astype(dtype)
            h = nn.leaky_relu(h, NEGATIVE_SLOPE)
        logits = self._conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)
        return logits.astype(jnp.float32)
