"""Logit filters and token draws shared by the samplers. Logits are `[..., V]` float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _nucleus_keep(desc: jax.Array, p: float, log_z: jax.Array) -> jax.Array:
    """For logits sorted in descending order `[..., K]` and the log normaliser `[..., 1]` of the distribution they
    belong to: True where a token survives top-p, i.e. where the probability of the tokens ranked above it is < p
    (equivalently, it is not among the least likely tokens whose cumulative probability is <= 1 - p). The most
    likely token always survives."""
    probs = jnp.exp(desc - log_z)
    above = jnp.cumsum(probs, axis=-1) - probs
    return above < p


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Temperature, then top-k (keep logits >= the k-th largest, ties kept), then top-p over what is left; removed
    logits become -inf. `top_k` <= 0 or >= V and `top_p` <= 0 switch the filters off.

    Both filters reduce to one threshold per row, read off the k best logits from `lax.top_k` (already sorted), so a
    full sort of the vocabulary is needed only for top-p without top-k (sorting 4096 logits is ~4x slower than
    `top_k(900)` on CPU).
    """
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p <= 0.0:
        return logits
    desc = jax.lax.top_k(logits, top_k)[0] if use_k else jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    threshold = desc[..., -1:]
    if top_p > 0.0:
        # top-p's probabilities are over everything top-k keeps: ties with the k-th logit count, though `desc`
        # holds only k of them
        log_z = jax.nn.logsumexp(jnp.where(logits >= threshold, logits, -jnp.inf), axis=-1, keepdims=True)
        n_keep = jnp.sum(_nucleus_keep(desc, top_p, log_z), axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits >= the k-th largest (ties kept), the rest -inf."""
    return filter_logits(logits, top_k=k)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter alone (see `filter_logits`)."""
    return filter_logits(logits, top_p=p)


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): `[..., V] -> [...]` int32."""
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
    """Soft Gumbel-softmax sample softmax((logits + g) / tau) `[..., V]` (VAR's 'more smooth' visualisation path)."""
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + g) / tau, axis=-1)
