"""Plain ``jnp`` reference for block-sparse attention (float32 softmax); the kernels are tested against it.

Shapes: ``q [B, H, Lq, D]``, ``k, v [B, H_kv, Lk, D]`` with grouped-query attention: ``H % H_kv == 0`` and query
head ``h`` uses kv head ``h // (H // H_kv)``. ``mask [Lq, Lk]`` bool (``True`` = may attend), shared by the batch
and heads. ``segment_ids`` (optional) further restricts attention to equal ids: either one int32 ``[B, L]`` array
(self-attention, ``Lq == Lk``) or a pair ``(q_segment_ids [B, Lq], kv_segment_ids [B, Lk])``.

Rows that may attend to nothing (all of their mask row is ``False``, or no key shares their segment id) are
DEFINED to output 0, with zero gradient through them, never NaN. (The usual ``softmax(-inf row)`` is 0/0.) The
kernels implement the same rule: the softmax normaliser of such a row is 0, and its output is set to 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels.block_sparse_attention import mask as mask_lib


def split_segment_ids(segment_ids, seq_len_q: int, seq_len_k: int):
    """``None`` | ``[B, L]`` | ``(q_ids [B, Lq], kv_ids [B, Lk])`` -> ``(q_ids, kv_ids)`` or ``(None, None)``."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                f"segment_ids: expected one [B, L] array or a pair (q_segment_ids, kv_segment_ids), "
                f"got a sequence of length {len(segment_ids)}"
            )
        return segment_ids[0], segment_ids[1]
    if seq_len_q != seq_len_k:
        raise ValueError(
            f"segment_ids: a single [B, L] array needs Lq == Lk (got Lq={seq_len_q}, Lk={seq_len_k}); "
            "pass a pair (q_segment_ids [B, Lq], kv_segment_ids [B, Lk])"
        )
    return segment_ids, segment_ids


def attention_reference(
    q: Float[Array, "b h lq d"],
    k: Float[Array, "b hkv lk d"],
    v: Float[Array, "b hkv lk d"],
    mask,
    *,
    sm_scale: float | None = None,
    segment_ids=None,
) -> Float[Array, "b h lq d"]:
    """``softmax(sm_scale * q k^T, masked) v`` in float32; returns ``[B, H, Lq, D]`` in ``q.dtype``."""
    _, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"k: number of kv heads {num_kv_heads} must divide the number of q heads {num_heads}")
    group = num_heads // num_kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / float(np.sqrt(head_dim))
    allowed = jnp.asarray(mask_lib.as_bool_array(mask))[None, None]  # [1, 1, Lq, Lk]
    q_ids, kv_ids = split_segment_ids(segment_ids, seq_q, seq_k)
    if q_ids is not None:
        allowed = allowed & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])  # [B, 1, Lq, Lk]

    k32 = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    v32 = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k32, precision="highest") * sm_scale
    row_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # where() before exp(): a disallowed logit becomes exp(-inf) = 0 with a zero (not NaN) gradient.
    probs = jnp.exp(jnp.where(allowed, logits - row_max, -jnp.inf))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)  # an empty row stays all-zero: output 0
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v32, precision="highest")
    return out.astype(q.dtype)
