"""What the rest of jaxgen reads of a tokenizer: the protocol every tokenizer module implements, so the loop, the
families and the samplers never ask which tokenizer they hold.

    tokenizer.vocab_size                    int, the number of codes (token ids are 0 .. vocab_size - 1)
    tokenizer.token_layout(image_size)      TokenLayout: how many ids an image becomes and how they are arranged
    tokenizer.last_layer                    path of the decoder's output kernel in the params (VQGAN's adaptive
                                            GAN weight is measured there)
    apply(..., img, method="encode_ids")    images `[B, H, W, 3]` in [-1, 1] -> ids `[B, L]` int32
    apply(..., ids, method="decode_ids")    ids `[B, L]` -> raw decoder output `[B, H, W, 3]` (not clamped)
    apply(..., img)                         training forward: (raw reconstruction, VQ loss, ids as the quantizer
                                            gives them: `[B, L]`, or a list of `[B, p_k^2]` per scale)

`vocab_size`, `token_layout` and `last_layer` need no params (call them on the unbound module).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """How an image's ids are laid out in the `[B, L]` sequence the generators read."""

    num_tokens: int  # L
    grid: tuple[int, int] | None = None  # (h, w) of a 2D token map, row-major; None for 1D tokens
    scale_sides: tuple[int, ...] | None = None  # multi-scale: side p_k of each scale's p_k x p_k map, coarse first

    def split_scales(self, ids_bl: jax.Array) -> list[jax.Array]:
        """`[B, L]` -> per scale `[B, p_k^2]` (multi-scale layouts only)."""
        if self.scale_sides is None:
            raise ValueError("split_scales: this token layout has no scales")
        out, begin = [], 0
        for p in self.scale_sides:
            out.append(ids_bl[:, begin : begin + p * p])
            begin += p * p
        return out


@runtime_checkable
class Tokenizer(Protocol):
    config: Any

    @property
    def vocab_size(self) -> int: ...

    @property
    def last_layer(self) -> tuple[str, ...]: ...

    def token_layout(self, image_size: int) -> TokenLayout: ...

    def encode_ids(self, img_bhwc: jax.Array) -> jax.Array: ...

    def decode_ids(self, ids_bl: jax.Array) -> jax.Array: ...
