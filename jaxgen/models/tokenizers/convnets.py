"""Convolutional encoder / decoder of the taming-transformers family (VQGAN, VAR's VQVAE, LlamaGen's VQ).

Layout is NHWC throughout: images `[B, H, W, 3]`, feature maps `[B, h, w, C]`.
Sub-module names follow the upstream PyTorch names (`down_0/block_1/conv1` for
`down.0.block.1.conv1`) so that checkpoint converters map keys mechanically.

Logical axes (`jaxgen.parallel.rules`): conv kernels ('conv_h', 'conv_w', 'conv_in', 'conv_out'), biases
('conv_out',), GroupNorm scale / bias ('norm',); feature maps ('batch', 'height', 'width', 'conv_out').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models.tokenizers.resize import nearest_upsample_2x
from jaxgen.parallel.logical import constrain, logical

NUM_GROUPS = 32  # every GroupNorm in this family has 32 groups
GN_EPS = 1e-6
FMAP_AXES = ("batch", "height", "width", "conv_out")  # logical axes of a feature map [B, h, w, C]


def group_norm(name: str | None = None, dtype: Any = jnp.float32) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) with the exact (two-pass) variance, as torch computes it."""
    return nn.GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=GN_EPS,
        use_fast_variance=False,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def conv(
    features: int,
    kernel: int,
    name: str | None = None,
    stride: int = 1,
    padding: Any = None,
    dtype: Any = jnp.float32,
    use_bias: bool = True,
) -> nn.Conv:
    """A 2D conv with torch's 'same' padding (kernel // 2) unless `padding` is given."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=logical(nn.linear.default_kernel_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1 `nin_shortcut` when channels change."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(
            nn.silu(group_norm(name="norm1", dtype=self.dtype)(x_bhwc))
        )
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(
            nn.silu(group_norm(name="norm2", dtype=self.dtype)(h))
        )
        if x_bhwc.shape[-1] != self.out_channels:
            x_bhwc = conv(self.out_channels, 1, name="nin_shortcut", dtype=self.dtype)(x_bhwc)
        return x_bhwc + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions: GN, 1x1 `qkv` (q|k|v), softmax(C^-0.5), 1x1 `proj_out`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        b, h, w, c = x_bhwc.shape
        qkv = conv(3 * c, 1, name="qkv", dtype=self.dtype)(group_norm(name="norm", dtype=self.dtype)(x_bhwc))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * c), 3, axis=-1)  # [B, N, C] each
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
        return x_bhwc + conv(c, 1, name="proj_out", dtype=self.dtype)(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 conv with stride 2: `[B, H, W, C] -> [B, H/2, W/2, C]`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        c = x_bhwc.shape[-1]
        return conv(c, 3, stride=2, padding=((0, 1), (0, 1)), name="conv", dtype=self.dtype)(x_bhwc)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: `[B, H, W, C] -> [B, 2H, 2W, C]`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        return conv(x_bhwc.shape[-1], 3, name="conv", dtype=self.dtype)(nearest_upsample_2x(x_bhwc))


class Level(nn.Module):
    """One resolution level: `num_blocks` res blocks, attention after each when `use_attn`, optional resampling."""

    out_channels: int
    num_blocks: int
    use_attn: bool
    resample: str | None  # "down" | "up" | None
    dtype: Any = jnp.float32

    def setup(self):
        self.block = [ResnetBlock(self.out_channels, dtype=self.dtype) for _ in range(self.num_blocks)]
        if self.use_attn:
            self.attn = [AttnBlock(dtype=self.dtype) for _ in range(self.num_blocks)]
        if self.resample == "down":
            self.downsample = Downsample(dtype=self.dtype)
        elif self.resample == "up":
            self.upsample = Upsample(dtype=self.dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.num_blocks):
            h = self.block[i](h)
            if self.use_attn:
                h = self.attn[i](h)
        if self.resample == "down":
            h = self.downsample(h)
        elif self.resample == "up":
            h = self.upsample(h)
        return h


class Mid(nn.Module):
    """res block -> attention -> res block at the lowest resolution."""

    channels: int
    use_attn: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.block_1 = ResnetBlock(self.channels, dtype=self.dtype)
        if self.use_attn:
            self.attn_1 = AttnBlock(dtype=self.dtype)
        self.block_2 = ResnetBlock(self.channels, dtype=self.dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self.block_1(h)
        if self.use_attn:
            h = self.attn_1(h)
        return self.block_2(h)


class Encoder(nn.Module):
    """Image `[B, H, W, in_ch]` -> latent `[B, H/2^(n-1), W/2^(n-1), z_channels]` with n = len(ch_mult)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    using_sa: bool = True  # attention at the lowest resolution level
    using_mid_sa: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        n = len(self.ch_mult)
        self.conv_in = conv(self.ch, 3, dtype=self.dtype)
        self.down = [
            Level(
                self.ch * m,
                self.num_res_blocks,
                use_attn=self.using_sa and i == n - 1,
                resample="down" if i != n - 1 else None,
                dtype=self.dtype,
            )
            for i, m in enumerate(self.ch_mult)
        ]
        self.mid = Mid(self.ch * self.ch_mult[-1], self.using_mid_sa, dtype=self.dtype)
        self.norm_out = group_norm(dtype=self.dtype)
        self.conv_out = conv(self.z_channels, 3, dtype=self.dtype)

    def __call__(self, img_bhwc: jax.Array) -> jax.Array:
        h = constrain(self.conv_in(img_bhwc.astype(self.dtype)), FMAP_AXES)
        for level in self.down:
            h = constrain(level(h), FMAP_AXES)
        h = self.mid(h)
        return constrain(self.conv_out(nn.silu(self.norm_out(h))), FMAP_AXES)


class Decoder(nn.Module):
    """Latent `[B, h, w, z_channels]` -> image `[B, h*2^(n-1), w*2^(n-1), out_ch]` (raw, not clamped)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int  # the decoder runs num_res_blocks + 1 blocks per level
    out_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        n = len(self.ch_mult)
        self.conv_in = conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype)
        self.mid = Mid(self.ch * self.ch_mult[-1], self.using_mid_sa, dtype=self.dtype)
        # `up_i` is level i (as upstream names it) although the levels run from n-1 down to 0.
        self.up = [
            Level(
                self.ch * m,
                self.num_res_blocks + 1,
                use_attn=self.using_sa and i == n - 1,
                resample="up" if i != 0 else None,
                dtype=self.dtype,
            )
            for i, m in enumerate(self.ch_mult)
        ]
        self.norm_out = group_norm(dtype=self.dtype)
        self.conv_out = conv(self.out_channels, 3, dtype=self.dtype)

    def __call__(self, z_bhwc: jax.Array) -> jax.Array:
        h = constrain(self.mid(self.conv_in(z_bhwc.astype(self.dtype))), FMAP_AXES)
        for level in reversed(self.up):
            h = constrain(level(h), FMAP_AXES)
        return constrain(self.conv_out(nn.silu(self.norm_out(h))), FMAP_AXES)
