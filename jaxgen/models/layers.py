"""Small shared layers: RMSNorm and rotary position embeddings (1D and LlamaGen's 2D).

RoPE tables are numpy float32 `[L, D/2, 2]` holding (cos, sin) per position and rotated pair; `apply_rope` rotates
adjacent pairs (2m, 2m+1) of a head vector as (real, imag), the Meta-LLaMA "interleaved" convention (not the
half-split `rotate_half` one). The first `cls_token_num` rows of a table are all zeros (cos = 0 and sin = 0), as in
LlamaGen: RoPE maps the class token's q and k to exactly 0.

Parameters carry logical axis names through `jaxgen.parallel.logical.logical`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from jaxgen.parallel.logical import logical


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    kernel_init: Callable = nn.linear.default_kernel_init,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """`nn.Dense` whose kernel carries the logical axis names (in, out) and whose zero-initialised bias carries (out,).
    `dtype` is the compute dtype (params stay float32)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=logical(kernel_init, names),
        bias_init=logical(nn.initializers.zeros_init(), names[1:]),
        name=name,
    )


def layer_norm(eps: float = 1e-5, *, affine: bool = True, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis in float32 with the two-pass variance (torch's); `affine=False`: no scale, no bias
    (VAR's AdaLN blocks). The scale and bias carry the logical axis 'norm'."""
    return nn.LayerNorm(
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        use_fast_variance=False,
        dtype=jnp.float32,
        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|_2, eps), as torch.nn.functional.normalize (the norm in float32; the result in x's dtype)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def token_cross_entropy(logits_blv: Float[Array, "B L V"], targets_bl: Int[Array, "B L"]) -> Float[Array, ""]:
    """Mean cross-entropy over every token `[B, L]` of float32 logits (VAR and LlamaGen weigh all tokens equally)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_blv.astype(jnp.float32), targets_bl).mean()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, computed in float32: `[..., D]` -> `[..., D]` float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + np.float32(self.eps))
        return x * scale


def _inv_freqs(n: int, base: float) -> np.ndarray:
    """LlamaGen's inverse frequencies for an n-wide rotated block: 1 / base^(k / n), k = 0, 2, ..., `[n // 2]` f32.

    Follows upstream's float32 torch code (`1.0 / (base ** (arange(0, n, 2)[: n // 2].float() / n))`): the exponent
    is rounded to float32 and the power is rounded once from float64 (numpy's float32 `powf` is off by an ulp more
    often than torch's), so the frequencies match torch's bit for bit for power-of-two widths."""
    exponent = (np.arange(0, n, 2)[: n // 2].astype(np.float32) / np.float32(n)).astype(np.float32)
    power = np.power(np.float64(base), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def _cos_sin(angles: np.ndarray) -> np.ndarray:
    """`[..., P]` float32 angles -> `[..., P, 2]` float32 (cos, sin), rounded once from float64."""
    a = angles.astype(np.float32).astype(np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=-1).astype(np.float32)


def _with_cls_rows(cache: np.ndarray, cls_token_num: int) -> np.ndarray:
    zeros = np.zeros((cls_token_num, *cache.shape[1:]), np.float32)
    return np.concatenate([zeros, cache.astype(np.float32)], axis=0)


def rope_1d_table(seq_len: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 0) -> np.ndarray:
    """1D RoPE over positions 0..seq_len-1, after `cls_token_num` all-zero rows:
    `[cls_token_num + seq_len, head_dim // 2, 2]` float32 (cos, sin)."""
    if head_dim % 2:
        raise ValueError(f"rope_1d_table: head_dim must be even, got {head_dim}")
    freqs = np.outer(np.arange(seq_len, dtype=np.float32), _inv_freqs(head_dim, base))  # [L, D/2]
    return _with_cls_rows(_cos_sin(freqs), cls_token_num)


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> np.ndarray:
    """LlamaGen's 2D RoPE for a `grid x grid` token map (row-major), after `cls_token_num` all-zero rows:
    `[cls_token_num + grid^2, head_dim // 2, 2]` float32 (cos, sin).

    Pairs m < D/4 rotate by the token's grid row, pairs m >= D/4 by its grid column, both with frequencies
    base^(-4j/D), j = 0..D/4-1."""
    if head_dim % 4:
        raise ValueError(f"rope_2d_table: head_dim must be a multiple of 4 (row and column halves), got {head_dim}")
    freqs = np.outer(np.arange(grid, dtype=np.float32), _inv_freqs(head_dim // 2, base))  # [G, D/4]
    rows = np.broadcast_to(freqs[:, None, :], (grid, grid, freqs.shape[1]))
    cols = np.broadcast_to(freqs[None, :, :], (grid, grid, freqs.shape[1]))
    angles = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, -1)  # [G*G, D/2]
    return _with_cls_rows(_cos_sin(angles), cls_token_num)


def apply_rope(x_blhd: Float[Array, "B L H D"], table_lp2: Float[Array, "L P 2"]) -> Float[Array, "B L H D"]:
    """Rotate adjacent pairs of each head vector: out[2m] = x[2m] cos - x[2m+1] sin, out[2m+1] = x[2m+1] cos +
    x[2m] sin, with (cos, sin) = `table_lp2[l, m]` (P = D/2). Computed in float32, returned in x's dtype."""
    b, seq, h, d = x_blhd.shape
    if table_lp2.shape != (seq, d // 2, 2):
        raise ValueError(f"apply_rope: table {tuple(table_lp2.shape)} does not fit x {tuple(x_blhd.shape)}")
    x = x_blhd.astype(jnp.float32).reshape(b, seq, h, d // 2, 2)
    t = jnp.asarray(table_lp2, jnp.float32)[None, :, None]  # [1, L, 1, P, 2]
    cos, sin = t[..., 0], t[..., 1]
    out = jnp.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin], axis=-1)
    return out.reshape(b, seq, h, d).astype(x_blhd.dtype)
