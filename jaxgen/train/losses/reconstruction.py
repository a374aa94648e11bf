"""Pixel reconstruction losses: element-wise means over every axis (batch included), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """mean(|x - y|) over all elements of two same-shape arrays (any shape): a float32 scalar, in x's units."""
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """mean((x - y)^2) over all elements of two same-shape arrays (any shape): a float32 scalar, in x's units^2."""
    return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
