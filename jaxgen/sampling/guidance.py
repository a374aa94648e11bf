"""Classifier-free guidance: batch doubling with the null class and the two ways upstreams mix the logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


def with_null_class(labels_b: Int[Array, " B"], null_class: int) -> Int[Array, " 2B"]:
    """`[labels; null, ..., null]`: the doubled batch a guided decode runs (rows B.. are unconditional)."""
    return jnp.concatenate([labels_b, jnp.full_like(labels_b, null_class)])


def split_guided(logits_2b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits of a doubled batch -> (conditional rows, unconditional rows)."""
    b = logits_2b.shape[0] // 2
    return logits_2b[:b], logits_2b[b:]


def guide(cond_logits: jax.Array, uncond_logits: jax.Array, scale: float | jax.Array) -> jax.Array:
    """(1 + t) * cond - t * uncond (VAR's form): t = 0 gives the conditional logits."""
    return (1.0 + scale) * cond_logits - scale * uncond_logits


def guide_from_uncond(cond_logits: jax.Array, uncond_logits: jax.Array, scale: float | jax.Array) -> jax.Array:
    """uncond + (cond - uncond) * scale (LlamaGen's and MaskGIT-PyTorch's form): scale 1 gives the conditional
    logits. Equal to `guide(cond, uncond, scale - 1)` in exact arithmetic; kept apart so each family rounds like
    its upstream."""
    return uncond_logits + (cond_logits - uncond_logits) * scale


def linear_ramp(cfg: float, si: int, num_scales: int) -> float:
    """VAR's guidance ramp over the scales: t = cfg * k / (S - 1), 0 at the first scale and `cfg` at the last."""
    return cfg * si / (num_scales - 1) if num_scales > 1 else cfg
