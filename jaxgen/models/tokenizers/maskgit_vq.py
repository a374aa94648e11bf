"""MaskGIT's VQGAN tokenizer (Chang et al., 2022): a conv encoder / decoder without attention blocks and without
quant / post-quant convs, and a plain (un-normalised) nearest-code quantizer.

Differences from the taming-style `convnets` VQGAN that a port must keep:
- down-sampling is a TF-style 2x2 average pool (padding cells not counted), up-sampling nearest x2 then a 3x3 conv;
- a res block is GN, swish, conv3x3 (no bias), GN, swish, conv3x3 (no bias); when the width changes, the skip branch
  is a 1x1 conv (no bias) applied to the block's *own output*, `out = h + conv1x1(h)`, not to its input (upstream's
  code does this, and the released weights have the `(1, 1, out, out)` kernels it implies);
- the encoder ends GN, swish, 1x1 conv (with bias) to `embedding_dim`; the decoder starts with a 3x3 conv (with bias).

Images: the jaxgen protocol's `[B, H, W, 3]` in [-1, 1] at `encode_ids` / `decode_ids` / `__call__`; upstream's
networks see and produce [0, 1] (`encode_unit` / `decode_unit` are that boundary, what the golden check drives).
Tokens `[B, h*w]` int32, row-major over the `H / 2^(len(channel_multipliers)-1)` grid.

Parameter names are upstream's Flax auto-names (`encoder/ResBlock_3/Conv_2/kernel`, `decoder/Conv_0` = input conv,
then the up-sampling convs deepest first, the output conv last), except the codebook: jaxgen's
`quantizer/embedding/embedding` for upstream's `quantizer/codebook` (the quantizer is the shared
`quantizers.VectorQuantizer` with `l2_norm=False`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.tokenizers.convnets import FMAP_AXES, conv, group_norm
from jaxgen.models.tokenizers.protocol import TokenLayout
from jaxgen.models.tokenizers.quantizers import VectorQuantizer, check_codebook_options
from jaxgen.models.tokenizers.resize import avg_pool_2x2, nearest_upsample_2x
from jaxgen.parallel.logical import constrain


@dataclasses.dataclass(frozen=True)
class MaskGITVQConfig:
    """Hyper-parameters of MaskGIT's tokenizer (defaults: the released ImageNet tokenizer, 16x down-sampling,
    54,515,587 params)."""

    codebook_size: int = 1024
    embedding_dim: int = 256
    filters: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    beta: float = 0.25  # commitment cost
    dtype: str = "float32"
    ema_decay: float = 0.0  # > 0: EMA codebook (training only, see quantizers.py); the release trains it by gradient
    dead_code_threshold: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        bad = [self.filters * m for m in self.channel_multipliers if (self.filters * m) % 32]
        if bad or self.filters % 32:
            raise ValueError(
                f"MaskGITVQConfig: every channel count must be a multiple of 32 (GroupNorm has 32 groups); filters="
                f"{self.filters} with channel_multipliers={self.channel_multipliers} gives {bad or [self.filters]}"
            )
        if not self.channel_multipliers or self.num_res_blocks < 1:
            raise ValueError("MaskGITVQConfig: needs at least one level and one res block per level")
        check_codebook_options(self.ema_decay, self.dead_code_threshold, "MaskGITVQConfig")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


class ResBlock(nn.Module):
    """`[B, h, w, C_in] -> [B, h, w, filters]`; see the module docstring for the skip branch."""

    filters: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        h = nn.swish(group_norm("GroupNorm_0", self.dtype)(x_bhwc))
        h = conv(self.filters, 3, "Conv_0", dtype=self.dtype, use_bias=False)(h)
        h = nn.swish(group_norm("GroupNorm_1", self.dtype)(h))
        h = conv(self.filters, 3, "Conv_1", dtype=self.dtype, use_bias=False)(h)
        skip = x_bhwc
        if x_bhwc.shape[-1] != self.filters:
            skip = conv(self.filters, 1, "Conv_2", dtype=self.dtype, use_bias=False)(h)  # upstream: of h, not x
        return constrain(h + skip, FMAP_AXES)


class Encoder(nn.Module):
    """Image `[B, H, W, 3]` in [0, 1] -> latent `[B, H/d, W/d, embedding_dim]`."""

    config: MaskGITVQConfig

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        x = conv(c.filters, 3, "Conv_0", dtype=dtype, use_bias=False)(x_bhwc.astype(dtype))
        block = 0
        levels = len(c.channel_multipliers)
        for i, mult in enumerate(c.channel_multipliers):
            for _ in range(c.num_res_blocks):
                x = ResBlock(c.filters * mult, dtype, name=f"ResBlock_{block}")(x)
                block += 1
            if i < levels - 1:
                x = avg_pool_2x2(x)
        for _ in range(c.num_res_blocks):
            x = ResBlock(c.filters * c.channel_multipliers[-1], dtype, name=f"ResBlock_{block}")(x)
            block += 1
        x = nn.swish(group_norm("GroupNorm_0", dtype)(x))
        return conv(c.embedding_dim, 1, "Conv_1", dtype=dtype)(x).astype(jnp.float32)


class Decoder(nn.Module):
    """Latent `[B, h, w, embedding_dim]` -> image `[B, h*d, w*d, 3]`, [0, 1] scale, not clamped."""

    config: MaskGITVQConfig

    @nn.compact
    def __call__(self, z_bhwc: jax.Array) -> jax.Array:
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        levels = len(c.channel_multipliers)
        x = conv(c.filters * c.channel_multipliers[-1], 3, "Conv_0", dtype=dtype)(z_bhwc.astype(dtype))
        block, up_conv = 0, 1
        for _ in range(c.num_res_blocks):
            x = ResBlock(c.filters * c.channel_multipliers[-1], dtype, name=f"ResBlock_{block}")(x)
            block += 1
        for i in reversed(range(levels)):
            for _ in range(c.num_res_blocks):
                x = ResBlock(c.filters * c.channel_multipliers[i], dtype, name=f"ResBlock_{block}")(x)
                block += 1
            if i > 0:
                x = conv(c.filters * c.channel_multipliers[i], 3, f"Conv_{up_conv}", dtype=dtype)(
                    nearest_upsample_2x(x)
                )
                up_conv += 1
        x = nn.swish(group_norm("GroupNorm_0", dtype)(x))
        return conv(3, 3, f"Conv_{up_conv}", dtype=dtype)(x).astype(jnp.float32)


class MaskGITVQ(nn.Module):
    """MaskGIT's tokenizer; implements `jaxgen.models.tokenizers.protocol.Tokenizer` (ids: a square grid,
    row-major). Use every method through `apply(..., method=...)`."""

    config: MaskGITVQConfig

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def last_layer(self) -> tuple[str, ...]:
        return ("decoder", f"Conv_{len(self.config.channel_multipliers)}", "kernel")

    def token_layout(self, image_size: int) -> TokenLayout:
        """The `(S/d) x (S/d)` token grid of an `S` px image (S a multiple of the down-sampling d)."""
        d = self.config.downsample
        if image_size % d:
            raise ValueError(
                f"data.image_size={image_size} is not a multiple of the tokenizer's down-sampling {d} "
                f"(2^(len(channel_multipliers)-1))"
            )
        g = image_size // d
        return TokenLayout(g * g, grid=(g, g))

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantizer = VectorQuantizer(
            c.codebook_size,
            c.embedding_dim,
            l2_norm=False,
            beta=c.beta,
            ema_decay=c.ema_decay,
            dead_code_threshold=c.dead_code_threshold,
        )

    def _check(self, img_bhwc) -> None:
        d = self.config.downsample
        if img_bhwc.ndim != 4 or img_bhwc.shape[-1] != 3 or img_bhwc.shape[1] % d or img_bhwc.shape[2] % d:
            raise ValueError(
                f"MaskGITVQ expects images [B, H, W, 3] with H and W multiples of {d}, got {tuple(img_bhwc.shape)}"
            )

    # ---- upstream's [0, 1] boundary --------------------------------------------------------------------------

    def encode_unit(self, img01_bhwc: Float[Array, "B H W 3"]) -> Float[Array, "B h w E"]:
        """Images in [0, 1] -> the encoder output (the vectors that are quantised), float32."""
        self._check(img01_bhwc)
        return constrain(self.encoder(img01_bhwc), ("batch", "height", "width", "latent"))

    def decode_unit(self, z_bhwc: Float[Array, "B h w E"]) -> Float[Array, "B H W 3"]:
        """Latent (codebook rows, or any map) -> image on upstream's [0, 1] scale, not clamped."""
        return self.decoder(z_bhwc)

    def codes(self, idx_bl: Int[Array, "B L"]) -> Float[Array, "B g g E"]:
        """Token ids of a square grid -> their codebook rows `[B, g, g, E]`."""
        g = math.isqrt(idx_bl.shape[-1])
        if g * g != idx_bl.shape[-1]:
            raise ValueError(f"MaskGITVQ: {idx_bl.shape[-1]} tokens are not a square grid")
        return self.quantizer.codes(idx_bl, (g, g))

    # ---- the jaxgen protocol ([-1, 1] images) ----------------------------------------------------------------

    def encode_ids(self, img_bhwc: Float[Array, "B H W 3"]) -> Int[Array, "B L"]:
        """Images in [-1, 1] -> token ids `[B, h*w]` int32, row-major (nearest code by squared distance, first
        index on ties)."""
        return self.quantizer.lookup(self.encode_unit((img_bhwc + 1.0) / 2.0))

    def decode_ids(self, idx_bl: Int[Array, "B L"]) -> Float[Array, "B H W 3"]:
        """Token ids `[B, g*g]` -> raw image on the [-1, 1] scale (2 * upstream's output - 1), not clamped."""
        return self.decode_unit(self.codes(idx_bl)) * 2.0 - 1.0

    def codebook(self) -> Float[Array, "V E"]:
        return self.quantizer.codebook()

    def __call__(self, img_bhwc: Float[Array, "B H W 3"]):
        """Training forward on [-1, 1] images: (raw reconstruction on the [-1, 1] scale, codebook + commitment
        loss, ids `[B, h*w]`), straight-through gradients to the encoder."""
        quant, loss, idx = self.quantizer(self.encode_unit((img_bhwc + 1.0) / 2.0))
        return self.decode_unit(quant) * 2.0 - 1.0, loss, idx
