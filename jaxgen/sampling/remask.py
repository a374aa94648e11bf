"""Confidence-based re-masking, the step masked decoders (MaskGIT, HMAR's refinement) share: of the tokens just
drawn, keep the confident ones and mask the rest again for the next step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def mask_by_confidence(
    key: jax.Array,
    probs_bl: Float[Array, "B L"],
    num_masked_b1: Int[Array, "B 1"],
    temperature: float | jax.Array,
) -> Bool[Array, "B L"]:
    """True for the `num_masked` least confident positions of each row (MaskGIT's `mask_by_random_topk`).

    Confidence is log(p) + temperature * Gumbel noise, with p the probability of the token drawn at that position
    (set p = inf, i.e. probs 1e9 or +inf, where a token is fixed and must never be masked again); positions whose
    confidence is below the `num_masked`-th smallest are masked. Temperature 0 masks exactly the least likely
    tokens (ties aside); a high temperature masks nearly at random."""
    confidence = jnp.log(probs_bl) + temperature * jax.random.gumbel(key, probs_bl.shape, jnp.float32)
    cut = jnp.take_along_axis(jnp.sort(confidence, axis=-1), num_masked_b1.astype(jnp.int32), axis=-1)
    return confidence < cut


def mask_lowest(confidence_bl: Float[Array, "B L"], count: int | Int[Array, "B 1"]) -> Bool[Array, "B L"]:
    """True for the `count` positions of each row with the lowest confidence (HMAR's re-masking: no noise). The
    order is a stable sort, so equal confidences mask the lowest index first; +inf marks positions never to mask."""
    rank = jnp.argsort(jnp.argsort(confidence_bl, axis=-1, stable=True), axis=-1, stable=True)
    return rank < count
