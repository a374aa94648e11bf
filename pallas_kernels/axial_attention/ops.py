"""Public axial attention op: input checks, folding the grid into sequences, padding, ``jax.custom_vjp``.

``axial_attention(q, k, v, axis=...)`` attends along one axis of a ``[B, H, R, C, D]`` grid (see ``reference.py``
for the exact semantics). The axis that is *not* attended over is folded into the batch: for ``axis="row"`` that is
a free reshape to ``[B*H*R, C, D]``; for ``axis="col"`` a transpose ``R <-> C`` then a reshape to ``[B*H*C, R, D]``.
The sequences are padded to a multiple of the block sizes and handed to one flash-attention kernel (``kernel.py``),
whose backward pass (``dq``, ``dk``, ``dv``) is also in Pallas. Transposes, reshapes and padding sit outside the
``custom_vjp`` boundary, so JAX differentiates them itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import kernel
from .reference import canonical_axis

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MIN_BLOCK = 16  # Triton's smallest matmul tile; also a multiple of the TPU sublane count (8).


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16). They change speed, not results (up to float rounding order).

    Attributes:
      block_q, block_k: query rows per program / key rows per loop step in the forward kernel.
      block_q_dkv, block_k_dkv: the ``dk``/``dv`` kernel (one program per ``block_k_dkv`` keys).
      block_q_dq, block_k_dq: the ``dq`` kernel (one program per ``block_q_dq`` queries).

    Each size is clamped to the padded sequence length's next power of two (at least 16), so short axes do not pay
    for large tiles; the sequence is then padded to a multiple of the largest clamped size.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 32
    block_q_dq: int = 32
    block_k_dq: int = 32

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < MIN_BLOCK
                or not _is_power_of_two(value)
            ):
                raise ValueError(f"BlockSizes.{field.name} must be a power of two >= {MIN_BLOCK}; got {value!r}.")

    def clamped(self, seq_len: int) -> BlockSizes:
        """Sizes no larger than ``seq_len``'s next power of two (and at least ``MIN_BLOCK``)."""
        cap = max(MIN_BLOCK, _next_power_of_two(seq_len))
        return BlockSizes(**{f.name: min(getattr(self, f.name), cap) for f in dataclasses.fields(self)})

    def padded_length(self, seq_len: int) -> int:
        """``seq_len`` rounded up to a multiple of every (already clamped) block size."""
        step = max(getattr(self, f.name) for f in dataclasses.fields(self))  # Powers of two: the max is the lcm.
        return -(-seq_len // step) * step


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) arguments of the custom_vjp'd core."""

    seq_len: int
    padded_len: int
    sm_scale: float
    causal: bool
    blocks: BlockSizes
    interpret: bool


def _per_platform(fn, *args, interpret: bool):
    """Calls ``fn(*args, compiler_params=...)`` with Triton parameters when lowering for a GPU and None elsewhere.

    The choice is made at lowering time (``lax.platform_dependent``), not from the default backend: without explicit
    Triton parameters a GPU ``pallas_call`` may lower to Mosaic GPU (the default in JAX 0.10), which these kernels do
    not target, while Mosaic TPU rejects Triton parameters. Interpret mode takes none.
    """
    if interpret:
        return fn(*args, compiler_params=None)
    from jax.experimental.pallas import triton as plgpu

    triton = functools.partial(fn, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
    return jax.lax.platform_dependent(
        *args, cuda=triton, rocm=triton, default=functools.partial(fn, compiler_params=None)
    )


def _pad(x_nld: jax.Array, padded_len: int) -> jax.Array:
    extra = padded_len - x_nld.shape[1]
    return x_nld if extra == 0 else jnp.pad(x_nld, ((0, 0), (0, extra), (0, 0)))


def _flash_fwd(q_nld, k_nld, v_nld, cfg: _Config):
    q_p, k_p, v_p = (_pad(x, cfg.padded_len) for x in (q_nld, k_nld, v_nld))
    fwd = functools.partial(
        kernel.flash_forward,
        seq_len=cfg.seq_len,
        sm_scale=cfg.sm_scale,
        causal=cfg.causal,
        block_q=cfg.blocks.block_q,
        block_k=cfg.blocks.block_k,
        interpret=cfg.interpret,
    )
    o_p, lse = _per_platform(fwd, q_p, k_p, v_p, interpret=cfg.interpret)
    return o_p[:, : cfg.seq_len], (q_p, k_p, v_p, o_p, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_nld, k_nld, v_nld, cfg: _Config):
    return _flash_fwd(q_nld, k_nld, v_nld, cfg)[0]


def _flash_bwd(cfg: _Config, residuals, do_nld):
    q_p, k_p, v_p, o_p, lse = residuals
    do_p = _pad(do_nld, cfg.padded_len)  # Zero cotangents on padded query rows: the kernels rely on it.
    delta = jnp.sum(o_p.astype(jnp.float32) * do_p.astype(jnp.float32), axis=-1, keepdims=True)  # [N, L_pad, 1]
    bwd = functools.partial(
        kernel.flash_backward,
        seq_len=cfg.seq_len,
        sm_scale=cfg.sm_scale,
        causal=cfg.causal,
        block_q_dkv=cfg.blocks.block_q_dkv,
        block_k_dkv=cfg.blocks.block_k_dkv,
        block_q_dq=cfg.blocks.block_q_dq,
        block_k_dq=cfg.blocks.block_k_dq,
        interpret=cfg.interpret,
    )
    dq, dk, dv = _per_platform(bwd, q_p, k_p, v_p, do_p.astype(q_p.dtype), lse, delta, interpret=cfg.interpret)
    n = cfg.seq_len
    return dq[:, :n], dk[:, :n], dv[:, :n]


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q, k, v, causal, sm_scale, block_sizes) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array shaped [B, H, R, C, D]; got {type(x).__name__}.")
        if x.ndim != 5:
            raise ValueError(f"{name} must have rank 5, shaped [B, H, R, C, D]; got rank {x.ndim}, shape {x.shape}.")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(
                f"{name}.shape must equal q.shape (self-attention over one [B, H, R, C, D] grid); "
                f"got q.shape={q.shape}, {name}.shape={x.shape}."
            )
    if min(q.shape) < 1:
        raise ValueError(f"every dimension of q/k/v [B, H, R, C, D] must be >= 1; got shape {q.shape}.")
    head_dim = q.shape[-1]
    if not _is_power_of_two(head_dim) or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D (q.shape[-1]) must be a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]; got {head_dim}."
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be float32 or bfloat16; got {jnp.dtype(x.dtype).name}.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must share one dtype (float32 or bfloat16); got q.dtype={jnp.dtype(q.dtype).name}, "
            f"k.dtype={jnp.dtype(k.dtype).name}, v.dtype={jnp.dtype(v.dtype).name}."
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a Python bool; got {causal!r}.")
    if sm_scale is not None and (
        isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale)
    ):
        raise ValueError(f"sm_scale must be None (D**-0.5) or a finite Python float; got {sm_scale!r}.")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be None or a BlockSizes; got {type(block_sizes).__name__}.")


def axial_attention(
    q: Float[Array, "b h r c d"],
    k: Float[Array, "b h r c d"],
    v: Float[Array, "b h r c d"],
    *,
    axis: str | int,
    causal: bool = False,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "b h r c d"]:
    """Flash attention along the rows or the columns of a ``[B, H, R, C, D]`` grid.

    Args:
      q, k, v: ``[B, H, R, C, D]``, all float32 or all bfloat16; ``D`` a power of two in [16, 256].
      axis: ``"row"`` (or ``3`` / ``-2``, the attended dimension ``C``): position ``(r, c)`` attends to ``(r, c')``.
        ``"col"`` (or ``"column"`` / ``2`` / ``-3``, the attended dimension ``R``): ``(r, c)`` attends to ``(r', c)``.
      causal: Axial Transformer masking: along ``axis``, position ``i`` attends to ``j <= i`` only.
      sm_scale: logit scale; ``D**-0.5`` if None.
      block_sizes: kernel tiles; ``BlockSizes()`` if None.
      interpret: run the Pallas kernels in interpret mode (CPU, debugging).

    Returns:
      ``[B, H, R, C, D]`` in the input dtype. Differentiable in ``q``, ``k``, ``v`` (Pallas backward kernels).
    """
    axis = canonical_axis(axis)
    _check_inputs(q, k, v, causal, sm_scale, block_sizes)
    b, h, r, c, d = q.shape
    seq_len = c if axis == "row" else r
    blocks = (block_sizes or BlockSizes()).clamped(seq_len)
    cfg = _Config(
        seq_len=seq_len,
        padded_len=blocks.padded_length(seq_len),
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        causal=causal,
        blocks=blocks,
        interpret=bool(interpret),
    )

    if axis == "row":
        fold = lambda x: x.reshape(b * h * r, c, d)
        out_nld = _flash(fold(q), fold(k), fold(v), cfg)
        return out_nld.reshape(b, h, r, c, d)
    fold = lambda x: jnp.swapaxes(x, 2, 3).reshape(b * h * c, r, d)
    out_nld = _flash(fold(q), fold(k), fold(v), cfg)
    return jnp.swapaxes(out_nld.reshape(b, h, c, r, d), 2, 3)
