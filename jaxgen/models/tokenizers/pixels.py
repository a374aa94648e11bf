"""Pixels as tokens: the identity tokenizer of pixel-level models (the Axial Transformer). No parameters.

An image `[B, S, S, 3]` in [-1, 1] becomes its 8-bit values round((x + 1) * 127.5), clipped to 0..255, laid out
`[B, S * S * C]` in (row, column, channel) order; `channels` 1 keeps the first channel (the embedded digits are grey,
stored as three equal channels) and decoding repeats it three times. It implements the tokenizer protocol
(`jaxgen.models.tokenizers.protocol`), so pixel models train and sample through the same loop, token shards and
samplers as the VQ families.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.tokenizers.protocol import TokenLayout

NUM_VALUES = 256


@dataclasses.dataclass(frozen=True)
class PixelConfig:
    channels: int = 3  # 1 (grey: the first channel of the data) or 3 (RGB)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"PixelConfig.channels must be 1 (grey) or 3 (RGB), got {self.channels}")


def to_uint8(img: Float[Array, ...]) -> Int[Array, ...]:
    """[-1, 1] -> 0..255 int32 (rounded, clipped)."""
    return jnp.clip(jnp.round((img.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.int32)


def from_uint8(x: Int[Array, ...]) -> Float[Array, ...]:
    """0..255 -> [-1, 1] float32."""
    return x.astype(jnp.float32) / 127.5 - 1.0


class PixelTokenizer(nn.Module):
    config: PixelConfig

    @property
    def vocab_size(self) -> int:
        return NUM_VALUES

    @property
    def last_layer(self) -> tuple[str, ...]:
        raise ValueError("the pixel tokenizer has no decoder layer (nothing to train); it needs no tokenizer stage")

    def token_layout(self, image_size: int) -> TokenLayout:
        return TokenLayout(num_tokens=image_size * image_size * self.config.channels, grid=(image_size, image_size))

    def pixels(self, img_bhwc: Float[Array, "B H W 3"]) -> Int[Array, "B H W C"]:
        """Images in [-1, 1] -> 8-bit values `[B, H, W, C]`."""
        if img_bhwc.ndim != 4 or img_bhwc.shape[-1] not in (1, 3):
            raise ValueError(f"pixel tokenizer: images must be [B, H, W, 3] (or 1 channel), got {img_bhwc.shape}")
        return to_uint8(img_bhwc[..., : self.config.channels] if self.config.channels == 1 else img_bhwc)

    def encode_ids(self, img_bhwc: Float[Array, "B H W 3"]) -> Int[Array, "B L"]:
        x = self.pixels(img_bhwc)
        return x.reshape(x.shape[0], -1)

    def unflatten(self, ids_bl: Int[Array, "B L"]) -> Int[Array, "B H W C"]:
        """`[B, S * S * C]` -> `[B, S, S, C]` (S from L)."""
        c = self.config.channels
        side = round((ids_bl.shape[1] // c) ** 0.5)
        if side * side * c != ids_bl.shape[1]:
            raise ValueError(f"pixel tokenizer: {ids_bl.shape[1]} ids are not a square image of {c} channel(s)")
        return ids_bl.reshape(ids_bl.shape[0], side, side, c)

    def decode_pixels(self, x_bhwc: Int[Array, "B H W C"]) -> Float[Array, "B H W 3"]:
        img = from_uint8(x_bhwc)
        return jnp.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img

    def decode_ids(self, ids_bl: Int[Array, "B L"]) -> Float[Array, "B H W 3"]:
        return self.decode_pixels(self.unflatten(ids_bl))

    def __call__(self, img_bhwc):
        """The protocol's training forward: the exact reconstruction, zero VQ loss, the ids."""
        ids = self.encode_ids(img_bhwc)
        return self.decode_ids(ids), jnp.zeros((), jnp.float32), ids
