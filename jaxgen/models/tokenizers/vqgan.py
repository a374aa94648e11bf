"""VQGAN-style 2D tokenizer (LlamaGen's VQ-16): conv encoder -> 1x1 quant_conv -> L2-normalised VQ -> 1x1
post_quant_conv -> conv decoder.

Images `[B, H, W, 3]` in [-1, 1]; tokens `[B, h*w]` int32 row-major over the `h = H / 2^(len(ch_mult)-1)` grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.tokenizers.convnets import Decoder, Encoder, conv
from jaxgen.models.tokenizers.protocol import TokenLayout
from jaxgen.models.tokenizers.quantizers import VectorQuantizer, check_codebook_options
from jaxgen.parallel.logical import constrain


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of the VQGAN tokenizer (defaults: LlamaGen's VQ-16)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # encoder levels
    decoder_ch_mult: tuple[int, ...] | None = None  # None: the same as ch_mult; may have another length (the
    # decoder then upsamples by 2^(len(decoder_ch_mult) - 1), as upstream allows)
    num_res_blocks: int = 2  # the decoder runs one more per level
    l2_norm: bool = True
    beta: float = 0.25
    dtype: str = "float32"
    ema_decay: float = 0.0  # > 0: EMA codebook in the "codebook" collection instead of a param (see quantizers.py)
    dead_code_threshold: float = 0.0  # > 0 (EMA only): restart codes whose EMA cluster size falls below it

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult or self.ch_mult))
        bad = [self.ch * m for m in self.ch_mult + self.decoder_ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(
                f"VQConfig: every channel count must be a multiple of 32 (GroupNorm has 32 groups); "
                f"ch={self.ch} with ch_mult={self.ch_mult} gives {bad}"
            )
        check_codebook_options(self.ema_decay, self.dead_code_threshold, "VQConfig")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class VQGAN(nn.Module):
    """LlamaGen's VQ tokenizer; implements `jaxgen.models.tokenizers.protocol.Tokenizer` (ids: a square grid,
    row-major)."""

    config: VQConfig
    last_layer = ("decoder", "conv_out", "kernel")

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def token_layout(self, image_size: int) -> TokenLayout:
        """The `(S/d) x (S/d)` token grid of an `S` px image (S a multiple of the downsampling d)."""
        d = self.config.downsample
        if image_size % d:
            raise ValueError(
                f"data.image_size={image_size} is not a multiple of the VQ's downsampling {d} (2^(len(ch_mult)-1))"
            )
        g = image_size // d
        return TokenLayout(g * g, grid=(g, g))

    def setup(self):
        c = self.config
        dtype: Any = jnp.dtype(c.dtype)
        self.encoder = Encoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, dtype=dtype)
        self.decoder = Decoder(c.ch, c.decoder_ch_mult, c.num_res_blocks, dtype=dtype)
        self.quant_conv = conv(c.codebook_embed_dim, 1)
        self.post_quant_conv = conv(c.z_channels, 1)
        self.quantize = VectorQuantizer(
            c.codebook_size,
            c.codebook_embed_dim,
            c.l2_norm,
            c.beta,
            ema_decay=c.ema_decay,
            dead_code_threshold=c.dead_code_threshold,
        )

    def grid(self, img_bhwc) -> tuple[int, int]:
        """Token grid of an image size; a clear error when the size is not a multiple of the downsampling."""
        d = self.config.downsample
        if img_bhwc.ndim != 4 or img_bhwc.shape[-1] != 3 or img_bhwc.shape[1] % d or img_bhwc.shape[2] % d:
            raise ValueError(
                f"VQGAN expects images [B, H, W, 3] with H and W multiples of {d}, got {tuple(img_bhwc.shape)}"
            )
        return img_bhwc.shape[1] // d, img_bhwc.shape[2] // d

    def pre_quant(self, img_bhwc: Float[Array, "B H W 3"]) -> Float[Array, "B h w C"]:
        """quant_conv(encoder(img)): the un-normalised vectors the quantizer sees."""
        self.grid(img_bhwc)
        z = self.quant_conv(self.encoder(img_bhwc).astype(jnp.float32))
        return constrain(z, ("batch", "height", "width", "latent"))

    def encode(self, img_bhwc: Float[Array, "B H W 3"]) -> tuple[Float[Array, "B h w C"], Int[Array, "B l"]]:
        """Image -> (quantised map, token ids)."""
        quant, _, idx = self.quantize(self.pre_quant(img_bhwc))
        return quant, idx

    def decode(self, quant_bhwc: Float[Array, "B h w C"]) -> Float[Array, "B H W 3"]:
        """Quantised map -> raw reconstruction (not clamped)."""
        return self.decoder(self.post_quant_conv(quant_bhwc)).astype(jnp.float32)

    def decode_code(self, idx_bl: Int[Array, "B l"], hw: tuple[int, int]) -> Float[Array, "B H W 3"]:
        """Token ids `[B, h*w]` on an `hw` grid -> raw image."""
        if idx_bl.shape[-1] != hw[0] * hw[1]:
            raise ValueError(f"{idx_bl.shape[-1]} tokens do not fill a {hw[0]}x{hw[1]} grid")
        return self.decode(self.quantize.codes(idx_bl, hw))

    def encode_ids(self, img_bhwc: Float[Array, "B H W 3"]) -> Int[Array, "B l"]:
        """Image -> token ids `[B, h*w]` int32, row-major."""
        return self.encode(img_bhwc)[1]

    def decode_ids(self, idx_bl: Int[Array, "B l"]) -> Float[Array, "B H W 3"]:
        """Token ids `[B, g*g]` of a square grid -> raw image (not clamped)."""
        g = math.isqrt(idx_bl.shape[-1])
        return self.decode_code(idx_bl, (g, g))

    def codebook(self) -> Float[Array, "V C"]:
        return self.quantize.codebook()

    def __call__(self, img_bhwc: Float[Array, "B H W 3"]):
        """Training forward: (raw reconstruction, VQ loss, token ids)."""
        quant, loss, idx = self.quantize(self.pre_quant(img_bhwc))
        return self.decode(quant), loss, idx
