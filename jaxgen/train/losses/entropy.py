"""Codebook entropy regulariser (MaskGIT / MAGVIT style): confident per-position assignments, diverse overall."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def entropy_loss(logits: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Entropy loss of code-assignment logits `[..., V]` (e.g. negative squared distances to the V codes).

    probs = softmax(logits / temperature) at each of the N positions (all leading axes flattened):
      per_sample_entropy = mean over positions of H(probs)     (0 when every position picks one code);
      batch_entropy      = H(mean over positions of probs)      (log V when the codes are used uniformly);
      loss               = per_sample_entropy - batch_entropy.
    H is in nats (natural log). Log-probabilities come from log_softmax / logsumexp, never log(probs). Returns
    `(loss, {"per_sample_entropy": ..., "batch_entropy": ...})`, float32 scalars.
    """
    v = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.reshape(-1, v).astype(jnp.float32) / temperature, axis=-1)  # [N, V]
    per_sample_entropy = jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1))
    log_avg = jax.nn.logsumexp(log_p, axis=0) - np.float32(np.log(log_p.shape[0]))  # log mean_n p[n], [V]
    batch_entropy = -jnp.sum(jnp.exp(log_avg) * log_avg)
    loss = per_sample_entropy - batch_entropy
    return loss, {"per_sample_entropy": per_sample_entropy, "batch_entropy": batch_entropy}
