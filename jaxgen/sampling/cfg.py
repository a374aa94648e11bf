"""Classifier-free guidance."""

from __future__ import annotations

import jax


def guide(cond_logits: jax.Array, uncond_logits: jax.Array, scale: float | jax.Array) -> jax.Array:
    """(1 + t) * cond - t * uncond: t = 0 gives the conditional logits."""
    return (1.0 + scale) * cond_logits - scale * uncond_logits


def var_ramp(cfg: float, si: int, num_scales: int) -> float:
    """VAR's guidance ramp: t = cfg * k / (S - 1), 0 at the first scale and `cfg` at the last."""
    return cfg * si / (num_scales - 1) if num_scales > 1 else cfg


def guide_from_uncond(cond_logits: jax.Array, uncond_logits: jax.Array, scale: float | jax.Array) -> jax.Array:
    """uncond + (cond - uncond) * scale: LlamaGen's form (scale 1 gives the conditional logits). Equal to
    `guide(cond, uncond, scale - 1)` in exact arithmetic; kept apart so each family rounds like its upstream."""
    return uncond_logits + (cond_logits - uncond_logits) * scale
