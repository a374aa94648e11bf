"""The Axial Transformer's fast sampler: one jitted loop over channels, rows and columns, with caches.

Per channel k (raster order within a channel, channel 0 first): the conditioning map is computed once from the image
so far (the later channels still 0). Then, row by row:

- the inner decoder runs once per pixel on that one position: its causal row blocks keep a key / value cache over
  the row (`[B, heads, W, hd]` per block), so a pixel costs one position through the inner blocks;
- when the row is complete, the outer decoder runs once on it: its row blocks attend over the whole (finished) row,
  its causal column blocks read a key / value cache of the rows above (`[B * W, heads, H, hd]` per block); the output
  is the context u of the next row (upstream's shift down).

Upstream's `sample_fast` recomputes the outer decoder on the whole image once per row and the inner decoder on the
whole row once per pixel; the caches give the same numbers with H (resp. W) times less work there.

Each value is the Gumbel-max draw argmax(filtered logits + g) over the 256 values: `sample_with_noise` takes g from
the caller (`[B, H, W, C, 256]`, e.g. the fixture's noise), the sampler draws it from its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxgen.models.generators.axial import NUM_VALUES, AxialTransformer
from jaxgen.sampling.common import ClassConditionalSampler, check_labels
from jaxgen.sampling.filters import filter_logits


@dataclasses.dataclass(frozen=True)
class AxialSampling:
    """Sampling settings (defaults: upstream's plain draw at temperature 1)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


@flax.struct.dataclass
class AxialSample:
    pixels: jax.Array  # int32 [B, H, W, C], values 0..255
    decoded: jax.Array  # float32 [B, H, W, 3] in [-1, 1] (the pixel tokenizer's decode)
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]

    def token_arrays(self) -> dict[str, jax.Array]:
        return {"pixels": self.pixels}


# (channel, row, column: int32 []) -> Gumbel noise [B, 256] for that (sub)pixel
NoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _zeros_cache(num_layers: int, lines: int, heads: int, length: int, head_dim: int, dtype) -> tuple:
    shape = (lines, heads, length, head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def sample_pixels(
    model: AxialTransformer,
    params,
    labels_b: Int[Array, " B"],
    noise_fn: NoiseFn,
    settings: AxialSampling = AxialSampling(),
) -> Int[Array, "B H W C"]:
    """Every (sub)pixel in order (module docstring); traceable. `labels_b` is read only by class-conditional models."""
    c = model.config
    b, h, w, d = labels_b.shape[0], c.height, c.width, c.hidden_size
    dt = c.compute_dtype
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
    pos = apply(AxialTransformer.pos2d)  # [H, W, D]
    top_p = settings.top_p if settings.top_p < 1.0 else 0.0

    def choose(logits_bk, noise_bk):
        filtered = filter_logits(logits_bk, temperature=settings.temperature, top_k=settings.top_k, top_p=top_p)
        return jnp.argmax(filtered + noise_bk, axis=-1).astype(jnp.int32)

    def channel_body(k, img):
        cond = apply(AxialTransformer.conditioning, img, jnp.full((b,), k, jnp.int32), labels_b)
        cond = jnp.zeros((b, h, w, d), jnp.float32) if cond is None else jnp.broadcast_to(cond, (b, h, w, d))

        def row_body(r, carry):
            img, outer_cache, u_row = carry  # u_row [B, W, D]: the outer context of row r
            cond_row = jax.lax.dynamic_index_in_dim(cond, r, axis=1, keepdims=False)  # [B, W, D]
            base = u_row + jax.lax.dynamic_index_in_dim(pos, r, axis=0, keepdims=False) + cond_row

            def col_body(col, carry):
                row, left, inner_cache = carry  # left [B, D]: embedding of the pixel to the left (0 at column 0)
                x_in = left + jax.lax.dynamic_index_in_dim(base, col, axis=1, keepdims=False)
                logits, inner_cache = apply(AxialTransformer.inner_pixel, x_in, col, inner_cache)
                value = choose(logits, noise_fn(k, r, col))
                row = jax.lax.dynamic_update_index_in_dim(row, value, col, axis=1)
                return row, apply(AxialTransformer.embed_value, value), inner_cache

            inner_cache = _zeros_cache(c.num_inner_layers, b, c.num_heads, w, c.head_dim, dt)
            row0 = (jnp.zeros((b, w), jnp.int32), jnp.zeros((b, d), jnp.float32), inner_cache)
            row, _, _ = jax.lax.fori_loop(0, w, col_body, row0)
            img = _set_row(img, row, r, k)
            # the outer decoder on the finished row is the next row's context: none is needed after the last row
            u_next, outer_cache = jax.lax.cond(
                r < h - 1,
                lambda: apply(AxialTransformer.outer_row, row, cond_row, r, outer_cache),
                lambda: (u_row, outer_cache),
            )
            return img, outer_cache, u_next

        outer_cache = _zeros_cache(c.num_outer_layers // 2, b * w, c.num_heads, h, c.head_dim, dt)
        img, _, _ = jax.lax.fori_loop(0, h, row_body, (img, outer_cache, jnp.zeros((b, w, d), jnp.float32)))
        return img

    return jax.lax.fori_loop(0, c.channels, channel_body, jnp.zeros((b, h, w, c.channels), jnp.int32))


def _set_row(img_bhwc, row_bw, r, k):
    """img[:, r, :, k] = row (r, k traced)."""
    _b, h, _w, ch = img_bhwc.shape
    hit = (jnp.arange(h)[:, None] == r) & (jnp.arange(ch)[None, :] == k)  # [H, C]
    return jnp.where(hit[None, :, None, :], row_bw[:, None, :, None], img_bhwc)


def fixed_noise(noise_bhwck: Float[Array, "B H W C K"]) -> NoiseFn:
    """Reads each (sub)pixel's noise from a given array (upstream's `noise` input)."""

    def at(k, r, col):
        return noise_bhwck[:, r, col, k]

    return at


def gumbel_noise(key: jax.Array, batch: int) -> NoiseFn:
    """Draws each (sub)pixel's Gumbel noise from `key` folded with its position."""

    def at(k, r, col):
        sub = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, k), r), col)
        return jax.random.gumbel(sub, (batch, NUM_VALUES), jnp.float32)

    return at


def sample_axial(model, tokenizer, settings, params, tokenizer_params, labels_b, key) -> AxialSample:
    """`ClassConditionalSampler`'s sample function: pixels from `key`'s noise, then decoded by the pixel tokenizer."""
    pixels = sample_pixels(model, params, labels_b, gumbel_noise(key, labels_b.shape[0]), settings)
    decoded = tokenizer.apply({"params": tokenizer_params or {}}, pixels, method="decode_pixels")
    return AxialSample(pixels, decoded, (decoded + 1.0) / 2.0)


class AxialSampler(ClassConditionalSampler):
    """`sampler(params, tokenizer_params, labels, key) -> AxialSample`, compiled once per batch size; an
    unconditional model ignores the labels (they only set the batch). `with_noise(params, labels, noise)` is the
    deterministic sampler with given Gumbel noise `[B, H, W, C, 256]`."""

    def __init__(self, model: AxialTransformer, tokenizer, settings: AxialSampling | None = None):
        if tokenizer.config.channels != model.config.channels:
            raise ValueError(
                f"the pixel tokenizer has {tokenizer.config.channels} channel(s) but the axial model "
                f"{model.config.channels}: set pixels.channels / axial.channels to the same value"
            )
        super().__init__(sample_axial, model, tokenizer, settings or AxialSampling(), model.config.num_classes)
        self._noise_fn = jax.jit(lambda p, labels, noise: sample_pixels(model, p, labels, fixed_noise(noise),
                                                                        self.settings))  # fmt: skip

    def __call__(self, params, tokenizer_params, labels: Sequence[int] | jax.Array, key: jax.Array) -> AxialSample:
        if self.num_classes:
            check_labels(labels, self.num_classes, allow_null=False)
        return self._fn(params, tokenizer_params, jnp.asarray(labels, jnp.int32), key)

    def with_noise(self, params, labels, noise_bhwck) -> jax.Array:
        c = self.generator.config
        want = (len(labels), c.height, c.width, c.channels, NUM_VALUES)
        if tuple(noise_bhwck.shape) != want:
            raise ValueError(f"axial sampler: noise must be [B, H, W, C, 256] = {list(want)}, got "
                             f"{list(noise_bhwck.shape)}")  # fmt: skip
        return self._noise_fn(params, jnp.asarray(labels, jnp.int32), jnp.asarray(noise_bhwck, jnp.float32))
