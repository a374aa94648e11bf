"""Plain ``jnp`` axial attention: the numerical reference for the Pallas kernels (float32 softmax).

Inputs are ``[B, H, R, C, D]``: a grid of ``R`` rows by ``C`` columns per batch element and head.

* ``axis="row"`` (aliases ``3``, ``-2``: the dimension of ``q`` that is attended over, here ``C``): each position
  ``(r, c)`` attends to the positions ``(r, c')`` of its own row.
* ``axis="col"`` (aliases ``"column"``, ``2``, ``-3``: attended dimension ``R``): each position ``(r, c)`` attends to
  the positions ``(r', c)`` of its own column.
* ``causal=True`` (the Axial Transformer's masks): along the attended axis, position ``i`` attends to ``j <= i`` only
  (``c' <= c`` for rows, ``r' <= r`` for columns).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Axis = Literal["row", "col"]

_AXIS_ALIASES: dict[object, Axis] = {
    "row": "row",
    3: "row",
    -2: "row",
    "col": "col",
    "column": "col",
    2: "col",
    -3: "col",
}


def canonical_axis(axis: object) -> Axis:
    """Maps ``"row" | 3 | -2`` to ``"row"`` and ``"col" | "column" | 2 | -3`` to ``"col"``; else ValueError."""
    if isinstance(axis, np.integer):
        axis = int(axis)
    # bool is an int: True == 1 must not sneak through as an axis.
    if isinstance(axis, (str, int)) and not isinstance(axis, bool) and axis in _AXIS_ALIASES:
        return _AXIS_ALIASES[axis]
    raise ValueError(
        f"axis must be 'row' (or 3 / -2: attend along C, within a row) or 'col' (or 'column' / 2 / -3: attend "
        f"along R, within a column) of q/k/v shaped [B, H, R, C, D]; got {axis!r}."
    )


def axial_attention_reference(
    q: Float[Array, "b h r c d"],
    k: Float[Array, "b h r c d"],
    v: Float[Array, "b h r c d"],
    *,
    axis: object,
    causal: bool = False,
    sm_scale: float | None = None,
) -> Float[Array, "b h r c d"]:
    """Softmax attention along one axis of the grid, computed in float32; returns ``q.dtype``."""
    axis = canonical_axis(axis)
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    hi = jax.lax.Precision.HIGHEST
    if axis == "row":
        # logits[b, h, r, c, c'] = <q[b, h, r, c], k[b, h, r, c']>
        logits = jnp.einsum("bhrcd,bhred->bhrce", q32, k32, precision=hi)
    else:
        # logits[b, h, c, r, r'] = <q[b, h, r, c], k[b, h, r', c]>
        logits = jnp.einsum("bhrcd,bhscd->bhcrs", q32, k32, precision=hi)
    logits = logits * sm_scale
    if causal:
        length = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    if axis == "row":
        out = jnp.einsum("bhrce,bhred->bhrcd", weights, v32, precision=hi)
    else:
        out = jnp.einsum("bhcrs,bhscd->bhrcd", weights, v32, precision=hi)
    return out.astype(q.dtype)
