"""Logit filters and token draws shared by the samplers. Logits are `[..., V]` float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits >= the k-th largest (ties kept), set the rest to -inf. k <= 0 or k >= V: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: drop the least likely tokens whose cumulative probability is <= 1 - p (the most likely token
    always survives). p <= 0: unchanged."""
    if p <= 0.0:
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    n_drop = jnp.sum(cum[..., :-1] <= 1.0 - p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, n_drop, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Temperature, then top-k, then top-p."""
    if temperature != 1.0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): `[..., V] -> [...]` int32."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
    """Soft Gumbel-softmax sample softmax((logits + g) / tau) `[..., V]` (VAR's 'more smooth' visualisation path)."""
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + g) / tau, axis=-1)
