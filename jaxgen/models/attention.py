"""The attention op shared by the generators.

`dot_product_attention` is the dense ("xla") backend: q `[B, H, Lq, D]`, k / v `[B, H, Lk, D]`, an optional boolean
mask `[Lq, Lk]` (True = may attend). Logits and softmax run in float32 whatever the input dtype. The output carries
the logical axes ('batch', 'heads', 'length', 'kv') (a no-op outside a mesh, see `jaxgen.models.layers.constrain`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxgen.models.layers import constrain


def dot_product_attention(
    q_bhld: Float[Array, "B H Lq D"],
    k_bhld: Float[Array, "B H Lk D"],
    v_bhld: Float[Array, "B H Lk D"],
    *,
    mask_ll: np.ndarray | jax.Array | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """softmax(scale * q k^T + mask) v -> `[B, H, Lq, D]` in the dtype of `v`."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_bhld, k_bhld, preferred_element_type=jnp.float32) * scale
    if mask_ll is not None:
        logits = jnp.where(jnp.asarray(mask_ll), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v_bhld.dtype)
    return constrain(jnp.einsum("bhqk,bhkd->bhqd", weights, v_bhld), ("batch", "heads", "length", "kv"))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|_2, eps), as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)
