"""Codebook-health metrics for a V-code quantiser, all jit-able (`step` may be traced).

Usage over steps is tracked in a small state array `last_hit [V]` int32: the last training step at which each code
was selected, -1 for never (start from `jnp.full((V,), -1, jnp.int32)`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def update_last_hit(last_hit: jax.Array, ids: jax.Array, step: Any) -> jax.Array:
    """`last_hit [V]` int32 with every code in `ids` (int, any shape, values in [0, V)) set to `step`: `[V]` int32."""
    return last_hit.at[jnp.ravel(ids)].set(jnp.asarray(step, jnp.int32))


def window_usage(last_hit: jax.Array, step: Any, window: Any) -> jax.Array:
    """Fraction of the V codes used in the last `window` steps (steps step - window + 1 .. step; hits recorded after
    `step` do not count): float32 scalar."""
    step = jnp.asarray(step, jnp.int32)
    used = (last_hit >= 0) & (last_hit > step - jnp.asarray(window, jnp.int32)) & (last_hit <= step)
    return jnp.mean(used.astype(jnp.float32))


def _histogram(ids: jax.Array, vocab: int) -> jax.Array:
    return jnp.bincount(jnp.ravel(ids).astype(jnp.int32), length=vocab)


def perplexity(ids: jax.Array, vocab: int) -> jax.Array:
    """exp(entropy in nats of the code histogram of `ids` (any shape)): float32 scalar, 1 when one code takes every
    position, V when all V codes are equally frequent. `vocab` is static."""
    p = _histogram(ids, vocab).astype(jnp.float32) / ids.size
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def batch_usage(ids: jax.Array, vocab: int) -> jax.Array:
    """Fraction of the `vocab` codes that occur at least once in `ids` (any shape): float32 scalar. `vocab` static."""
    return jnp.mean((_histogram(ids, vocab) > 0).astype(jnp.float32))
