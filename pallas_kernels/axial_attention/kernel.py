"""Pallas flash-attention kernels over a batch of equal-length sequences, forward and backward.

Axial attention folds the axis it does not attend over into the batch, so everything here works on
arrays ``x_nld`` of shape ``[N, L_pad, D]``: ``N`` independent sequences, each of ``L_pad`` positions
(the true length ``seq_len`` padded up to a multiple of every block size), head dimension ``D``.

Grid layout follows the Triton-lowering style of JAX's ``pallas/ops/gpu/attention.py``: the grid is
``(num_blocks, N)``; each program owns one block of rows (queries for the forward and ``dq`` kernels,
keys/values for the ``dk``/``dv`` kernel) and loops with ``lax.fori_loop`` over blocks of the other
operand, which its BlockSpec maps whole (``[L_pad, D]``). No Triton-only primitives are used (plain ref
indexing with ``pl.ds``, ``lax.dot_general``, 2D iotas), so the same kernels run in interpret mode on
CPU. Padded keys are masked inside the kernels; padded query rows are computed and sliced away by the
caller, who also guarantees that their output cotangents are zero.

Numerics: logits, the running max/sum, the output accumulator and every gradient accumulator are
float32; the probabilities (and ``dS``) are cast to the input dtype before their matmuls, as flash
attention does on bfloat16 hardware paths. Row statistics (``lse``, ``delta``) are stored as
``[N, L_pad, 1]`` float32 so that a block is a 2D ``(block, 1)`` tile on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Finite stand-in for -inf: exp(MASK - m) underflows to 0 without inf - inf = nan.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(s, *, row_start, col_start, seq_len: int, causal: bool, mask_cols: bool):
    """Masks logits ``s`` [block_rows, block_cols] of padded keys (col >= seq_len) and, if causal, col > row."""
    if not (causal or mask_cols):
        return s
    cols = col_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    keep = None
    if mask_cols:
        keep = cols < seq_len
    if causal:
        rows = row_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        keep = cols <= rows if keep is None else jnp.logical_and(keep, cols <= rows)
    return jnp.where(keep, s, MASK_VALUE)


def _num_blocks_causal(row_block, block_rows: int, block_cols: int, num_col_blocks: int):
    """Number of column blocks that hold any col <= row for rows of block ``row_block``: blocks above the diagonal are
    skipped."""
    needed = lax.div((row_block + 1) * block_rows + block_cols - 1, block_cols)
    return jnp.minimum(needed, num_col_blocks)


# --------------------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, causal, seq_len, block_q, block_k):
    # q_ref, o_ref: [block_q, D]; k_ref, v_ref: [L_pad, D]; lse_ref: [block_q, 1].
    qi = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    num_kv_blocks = pl.cdiv(seq_len, block_k)  # Static: blocks made only of padding are never visited.
    mask_cols = seq_len % block_k != 0
    q = q_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, k, _NT) * sm_scale  # [block_q, block_k] float32
        s = _mask(s, row_start=qi * block_q, col_start=start, seq_len=seq_len, causal=causal, mask_cols=mask_cols)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)
        l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, _NN)
        return acc, m_next, l_next

    acc = jnp.zeros((block_q, head_dim), jnp.float32)
    row_max = jnp.full((block_q, 1), MASK_VALUE, jnp.float32)
    row_sum = jnp.zeros((block_q, 1), jnp.float32)
    upper = _num_blocks_causal(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    # Every row sees key 0 in the first block, so row_sum > 0 and row_max is a real logit after the loop.
    acc, row_max, row_sum = lax.fori_loop(0, upper, body, (acc, row_max, row_sum))
    o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
    lse_ref[...] = row_max + jnp.log(row_sum)


def flash_forward(
    q_nld: jax.Array,
    k_nld: jax.Array,
    v_nld: jax.Array,
    *,
    seq_len: int,
    sm_scale: float,
    causal: bool,
    block_q: int,
    block_k: int,
    interpret: bool,
    compiler_params=None,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(o_nld, lse_nl1)`` for padded ``[N, L_pad, D]`` inputs whose first ``seq_len`` positions are real."""
    n, l_pad, d = q_nld.shape
    kernel = functools.partial(
        _fwd_kernel, sm_scale=sm_scale, causal=causal, seq_len=seq_len, block_q=block_q, block_k=block_k
    )
    row_block = pl.BlockSpec((None, block_q, d), lambda i, b: (b, i, 0))
    full = pl.BlockSpec((None, l_pad, d), lambda i, b: (b, 0, 0))
    stat_block = pl.BlockSpec((None, block_q, 1), lambda i, b: (b, i, 0))
    return pl.pallas_call(
        kernel,
        grid=(l_pad // block_q, n),
        in_specs=[row_block, full, full],
        out_specs=[row_block, stat_block],
        out_shape=[
            jax.ShapeDtypeStruct(q_nld.shape, q_nld.dtype),
            jax.ShapeDtypeStruct((n, l_pad, 1), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="axial_attention_fwd",
    )(q_nld, k_nld, v_nld)


# --------------------------------------------------------------------------------------------------------------------
# Backward: dk/dv (one program per key block, loop over query blocks) and dq (one program per query block, loop over
# key blocks). delta = rowsum(o * do) is computed by the caller.


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, sm_scale, causal, seq_len, block_q, block_k
):
    # q_ref, do_ref: [L_pad, D]; lse_ref, delta_ref: [L_pad, 1]; k_ref, v_ref, dk_ref, dv_ref: [block_k, D].
    kj = pl.program_id(0)
    head_dim = k_ref.shape[-1]
    k_start = kj * block_k
    mask_cols = seq_len % block_k != 0
    k = k_ref[...]
    v = v_ref[...]

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q), :]
        delta = delta_ref[pl.ds(start, block_q), :]
        s = _dot(q, k, _NT) * sm_scale
        s = _mask(s, row_start=start, col_start=k_start, seq_len=seq_len, causal=causal, mask_cols=mask_cols)
        p = jnp.exp(s - lse)  # [block_q, block_k]
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        dp = _dot(do, v, _NT)
        ds = p * (dp - delta) * sm_scale
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
        return dk, dv

    dk = jnp.zeros((block_k, head_dim), jnp.float32)
    dv = jnp.zeros((block_k, head_dim), jnp.float32)
    # Query blocks made only of padding have zero cotangents: skip them. With causal masking, query blocks that end
    # before this key block starts see none of its keys.
    lower = lax.div(k_start, block_q) if causal else 0
    dk, dv = lax.fori_loop(lower, pl.cdiv(seq_len, block_q), body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, sm_scale, causal, seq_len, block_q, block_k):
    # q_ref, do_ref, dq_ref: [block_q, D]; lse_ref, delta_ref: [block_q, 1]; k_ref, v_ref: [L_pad, D].
    qi = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    num_kv_blocks = pl.cdiv(seq_len, block_k)
    mask_cols = seq_len % block_k != 0
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, k, _NT) * sm_scale
        s = _mask(s, row_start=qi * block_q, col_start=start, seq_len=seq_len, causal=causal, mask_cols=mask_cols)
        p = jnp.exp(s - lse)
        dp = _dot(do, v, _NT)
        ds = p * (dp - delta) * sm_scale
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    upper = _num_blocks_causal(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    dq = lax.fori_loop(0, upper, body, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def flash_backward(
    q_nld: jax.Array,
    k_nld: jax.Array,
    v_nld: jax.Array,
    do_nld: jax.Array,
    lse_nl1: jax.Array,
    delta_nl1: jax.Array,
    *,
    seq_len: int,
    sm_scale: float,
    causal: bool,
    block_q_dkv: int,
    block_k_dkv: int,
    block_q_dq: int,
    block_k_dq: int,
    interpret: bool,
    compiler_params=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(dq, dk, dv)`` (input dtype, padded shape). ``do`` must be zero on padded query rows."""
    n, l_pad, d = q_nld.shape
    common = dict(sm_scale=sm_scale, causal=causal, seq_len=seq_len)

    full = pl.BlockSpec((None, l_pad, d), lambda i, b: (b, 0, 0))
    full_stat = pl.BlockSpec((None, l_pad, 1), lambda i, b: (b, 0, 0))
    k_block = pl.BlockSpec((None, block_k_dkv, d), lambda i, b: (b, i, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=block_q_dkv, block_k=block_k_dkv, **common),
        grid=(l_pad // block_k_dkv, n),
        in_specs=[full, k_block, k_block, full, full_stat, full_stat],
        out_specs=[k_block, k_block],
        out_shape=[
            jax.ShapeDtypeStruct(k_nld.shape, k_nld.dtype),
            jax.ShapeDtypeStruct(v_nld.shape, v_nld.dtype),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="axial_attention_bwd_dkdv",
    )(q_nld, k_nld, v_nld, do_nld, lse_nl1, delta_nl1)

    q_block = pl.BlockSpec((None, block_q_dq, d), lambda i, b: (b, i, 0))
    q_stat = pl.BlockSpec((None, block_q_dq, 1), lambda i, b: (b, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=block_q_dq, block_k=block_k_dq, **common),
        grid=(l_pad // block_q_dq, n),
        in_specs=[q_block, full, full, q_block, q_stat, q_stat],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_nld.shape, q_nld.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="axial_attention_bwd_dq",
    )(q_nld, k_nld, v_nld, do_nld, lse_nl1, delta_nl1)
    return dq, dk, dv
