"""Vector-quantisation losses (VQ-VAE / VQGAN) and the straight-through estimator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def vq_losses(z: jax.Array, e: jax.Array, beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """VQ losses for encoder outputs `z` and their selected codebook vectors `e` (same shape, e.g. `[B, h, w, D]`).

    Returns `(z_q_st, codebook_loss, commitment_loss)`:
      z_q_st          = z + sg(e - z): value e, gradient passed straight through to z (shape and dtype of z);
      codebook_loss   = mean((e - sg(z))^2): moves the codes only (float32 scalar);
      commitment_loss = beta * mean((sg(e) - z)^2): moves the encoder only (float32 scalar).
    Means are over every element, in z's units^2.
    """
    z32, e32 = z.astype(jnp.float32), e.astype(jnp.float32)
    codebook_loss = jnp.mean(jnp.square(e32 - sg(z32)))
    commitment_loss = beta * jnp.mean(jnp.square(sg(e32) - z32))
    z_q_st = z + sg(e.astype(z.dtype) - z)
    return z_q_st, codebook_loss, commitment_loss
