"""VAR's multi-scale residual VQVAE: conv encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

Images are NHWC `[B, H, W, 3]` in [-1, 1]; the latent is `[B, P, P, z_channels]` with P = patch_nums[-1] and
H = W = P * 2^(len(ch_mult) - 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.tokenizers.convnets import Decoder, Encoder, conv
from jaxgen.models.tokenizers.protocol import TokenLayout
from jaxgen.models.tokenizers.quantizers import MultiScaleResidualQuantizer, check_codebook_options
from jaxgen.parallel.logical import constrain


@dataclasses.dataclass(frozen=True)
class MSVQConfig:
    """Hyper-parameters of the multi-scale VQVAE (defaults: the released `vae_ch160v4096z32`)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    using_znorm: bool = False
    beta: float = 0.25
    dtype: str = "float32"  # compute dtype of the conv nets (params stay float32)
    ema_decay: float = 0.0  # > 0: EMA codebook in the "codebook" collection instead of a param (see quantizers.py)
    dead_code_threshold: float = 0.0  # > 0 (EMA only): restart codes whose EMA cluster size falls below it

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(
                f"MSVQConfig: every channel count must be a multiple of 32 (GroupNorm has 32 groups); "
                f"ch={self.ch} with ch_mult={self.ch_mult} gives {bad}"
            )
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"MSVQConfig: patch_nums must increase, got {self.patch_nums}")
        check_codebook_options(self.ema_decay, self.dead_code_threshold, "MSVQConfig")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


class MultiScaleVQVAE(nn.Module):
    """VAR's tokenizer; implements `jaxgen.models.tokenizers.protocol.Tokenizer` (ids: the scales concatenated,
    coarse first)."""

    config: MSVQConfig
    last_layer = ("decoder", "conv_out", "kernel")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def token_layout(self, image_size: int) -> TokenLayout:
        """The scales' token maps at `image_size` px, which must be patch_nums[-1] x the downsampling."""
        c = self.config
        if image_size != c.image_size:
            raise ValueError(
                f"data.image_size={image_size} does not fit the tokenizer: patch_nums[-1]={c.patch_nums[-1]} x "
                f"downsample {c.downsample} (2^(len(ch_mult)-1)) = {c.image_size} px. Set data.image_size="
                f"{c.image_size} or change the tokenizer's patch_nums / ch_mult."
            )
        return TokenLayout(sum(p * p for p in c.patch_nums), scale_sides=c.patch_nums)

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.encoder = Encoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, dtype=dtype)
        self.decoder = Decoder(c.ch, c.ch_mult, c.num_res_blocks, dtype=dtype)
        self.quant_conv = conv(c.z_channels, c.quant_conv_ks)
        self.post_quant_conv = conv(c.z_channels, c.quant_conv_ks)
        self.quantize = MultiScaleResidualQuantizer(
            c.vocab_size,
            c.z_channels,
            c.patch_nums,
            c.quant_resi,
            c.share_quant_resi,
            c.default_qresi_counts,
            c.using_znorm,
            c.beta,
            ema_decay=c.ema_decay,
            dead_code_threshold=c.dead_code_threshold,
        )

    def check_image(self, img_bhwc: jax.Array) -> None:
        c = self.config
        s = c.image_size
        if img_bhwc.ndim != 4 or tuple(img_bhwc.shape[1:]) != (s, s, 3):
            fits = img_bhwc.shape[1] // c.downsample if img_bhwc.ndim == 4 else "?"
            raise ValueError(
                f"MultiScaleVQVAE expects images [B, {s}, {s}, 3] (patch_nums[-1]={c.patch_nums[-1]} x downsample "
                f"{c.downsample}), got {tuple(img_bhwc.shape)}; resize the images or use a config whose patch_nums "
                f"end at {fits}"
            )

    def encode(self, img_bhwc: Float[Array, "B H W 3"]) -> Float[Array, "B P P C"]:
        """Image `[B, H, W, 3]` -> f = quant_conv(encoder(img)) `[B, P, P, Cvae]` (float32)."""
        self.check_image(img_bhwc)
        f = self.quant_conv(self.encoder(img_bhwc).astype(jnp.float32))
        return constrain(f, ("batch", "height", "width", "latent"))

    def img_to_indices(self, img_bhwc: Float[Array, "B H W 3"]) -> list[Int[Array, "B l"]]:
        """Image -> per-scale token ids, a list of `[B, p*p]` int32."""
        return self.quantize.quantize(self.encode(img_bhwc))[0]

    def encode_ids(self, img_bhwc: Float[Array, "B H W 3"]) -> Int[Array, "B L"]:
        """Image -> ids `[B, L]` int32, the scales concatenated coarse first."""
        return jnp.concatenate(self.img_to_indices(img_bhwc), axis=1)

    def decode_ids(self, ids_bl: Int[Array, "B L"]) -> Float[Array, "B H W 3"]:
        """Ids `[B, L]` (scales concatenated) -> raw decoder output `[B, H, W, 3]` (not clamped)."""
        layout = TokenLayout(sum(p * p for p in self.config.patch_nums), scale_sides=self.config.patch_nums)
        return self.fhat_to_img(self.quantize.indices_to_fhat(layout.split_scales(ids_bl)))

    def fhat_to_img(self, f_hat: Float[Array, "B P P C"]) -> Float[Array, "B H W 3"]:
        """f_hat `[B, P, P, Cvae]` -> raw decoder output `[B, H, W, 3]` (not clamped)."""
        return self.decoder(self.post_quant_conv(f_hat)).astype(jnp.float32)

    def indices_to_img(self, indices: Sequence[Int[Array, "B l"]]) -> Float[Array, "B H W 3"]:
        """Per-scale ids -> reconstruction `[B, H, W, 3]` clamped to [-1, 1]."""
        return jnp.clip(self.fhat_to_img(self.quantize.indices_to_fhat(indices)), -1.0, 1.0)

    def teacher_forcing_input(self, indices: Sequence[Int[Array, "B l"]]) -> Float[Array, "B L1 C"]:
        """Per-scale ids -> VAR's teacher-forcing input `[B, L - p_0^2, Cvae]`."""
        return self.quantize.teacher_forcing_input(indices)

    def own_scale_input(self, indices: Sequence[Int[Array, "B l"]]) -> Float[Array, "B L1 C"]:
        """Per-scale ids -> HMAR's own-token input `[B, L - p_0^2, Cvae]` (see
        `MultiScaleResidualQuantizer.own_scale_input`)."""
        return self.quantize.own_scale_input(indices)

    def own_scale_map(self, si: int, h_bhwc: jax.Array) -> jax.Array:
        """See `MultiScaleResidualQuantizer.own_scale_map`."""
        return self.quantize.own_scale_map(si, h_bhwc)

    def next_autoregressive_input(self, si: int, f_hat: jax.Array, h_bhwc: jax.Array):
        """See `MultiScaleResidualQuantizer.next_autoregressive_input`."""
        return self.quantize.next_autoregressive_input(si, f_hat, h_bhwc)

    def codebook(self) -> Float[Array, "V C"]:
        """The code vectors `[V, Cvae]` (the param, or the EMA codebook variable)."""
        return self.quantize.codebook()

    def __call__(self, img_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """Training forward: (raw reconstruction `[B, H, W, 3]`, VQ loss, per-scale ids)."""
        f_hat, vq_loss, indices = self.quantize(self.encode(img_bhwc))
        return self.fhat_to_img(f_hat), vq_loss, indices
