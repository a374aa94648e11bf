"""MaskGIT's mask schedules: the fraction of tokens still masked, as a function of progress r in [0, 1].

`schedule(r, n, method)`: "uniform" 1 - r, "pow<x>" 1 - r^x (any float x > 0: "pow1.5", "pow2"), "cosine"
cos(pi/2 r), "log" -log2(r) / log2(n), "exp" 1 - 2^(-log2(n) (1 - r)); clipped to [1e-6, 1]. Decoding evaluates it
at r = (t + 1) / T, training at a uniform r per sample.

Everything is float32 `jnp`, op for op as upstream (`maskgit/libml/mask_schedule.py`). That matters: the decoder
floors n0 * schedule(r), and float32 rounding can land just below an integer (256 tokens, T = 12, step 7:
256 * cos(pi/3) = 127.99999 -> 127 where float64 gives 128), so a float64 port would decode differently.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

SCHEDULES = ("uniform", "cosine", "log", "exp", "pow<x>")


def _pow_exponent(method: str) -> float | None:
    """The x of "pow<x>", or None when `method` is not of that form (or x is not a finite float > 0)."""
    if not method.startswith("pow"):
        return None
    try:
        x = float(method[3:])
    except ValueError:
        return None
    return x if math.isfinite(x) and x > 0 else None


def check_schedule(method: str) -> str:
    """`method` if it names a schedule, else a ValueError listing the allowed names."""
    if method in SCHEDULES[:4] or (isinstance(method, str) and _pow_exponent(method) is not None):
        return method
    raise ValueError(
        f"unknown mask schedule {method!r}: use one of 'uniform', 'cosine', 'log', 'exp' or 'pow<x>' with x a "
        f"positive number (e.g. 'pow1.5', 'pow2')"
    )


def schedule(ratio: Float[Array, ...] | float, total_unknown: Int[Array, ...] | int, method: str) -> jax.Array:
    """Mask ratio in [1e-6, 1] float32, shaped like `ratio`; `total_unknown` (n) enters only the log and exp
    schedules, broadcast against `ratio` (the decoder passes n0 `[B]`, the masked count per row at the start)."""
    check_schedule(method)
    r = jnp.asarray(ratio, jnp.float32)
    if method == "uniform":
        out = 1.0 - r
    elif method == "cosine":
        out = jnp.cos(jnp.float32(math.pi / 2.0) * r)
    elif method in ("log", "exp"):
        log_n = jnp.log2(jnp.asarray(total_unknown, jnp.float32))
        out = -jnp.log2(r) / log_n if method == "log" else 1.0 - jnp.exp2(-log_n * (1.0 - r))
    else:
        out = 1.0 - r ** _pow_exponent(method)
    return jnp.clip(out, jnp.float32(1e-6), jnp.float32(1.0))


def masked_count(ratio_b: Float[Array, " B"], num_tokens: int, method: str) -> Int[Array, " B"]:
    """Tokens to mask per training sample, ceil(schedule(r) * N) in [1, N] int32 `[B]`, for r ~ U[0, 1) `[B]`."""
    count = jnp.ceil(schedule(ratio_b, num_tokens, method) * jnp.float32(num_tokens))
    return jnp.clip(count, 1, num_tokens).astype(jnp.int32)
