"""Block-sparse flash attention for GPUs: Pallas kernels with the Triton lowering (forward, dK/dV, dQ).

Each program of the forward kernel owns one ``block_q`` tile of queries of one (batch, head) and runs the online
softmax over only the non-empty ``block_k`` tiles of its row of the block layout: first the partial tiles (mask
tile loaded and applied), then the full ones (no mask load, no select). Empty tiles are never touched. The
logsumexp (base 2, scale folded in) is saved for the backward pass:

* ``delta = rowsum(dO * O)`` in float32 (plain XLA: one fused elementwise-reduce).
* dK/dV kernel: one program per (batch, kv head, ``block_k_dkv`` tile) iterates over the query heads of its
  GQA group and the non-empty ``block_q_dkv`` tiles of its column (the transposed layout), so dK/dV of a shared
  kv head are summed in float32 inside the kernel.
* dQ kernel: one program per (batch, head, ``block_q_dq`` tile) iterates over its non-empty ``block_k_dq`` tiles.

All matmuls accumulate in float32; inputs may be float32, bfloat16 or float16 (float32 inputs use IEEE-precision
dots; bfloat16/float16 cast the probabilities and dS to the input dtype before their matmuls, as flash attention
does). Rows with no allowed key get output 0, logsumexp ``+inf`` and zero gradients (see ``reference.py``).

The module is one implementation of the kernel contract described in ``ops.py`` (``adjust_block_sizes``,
``prepare``, ``forward``, ``backward``); ``kernel_tpu.py`` implements the same four functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention import mask as mask_lib

DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)
MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16


# ----------------------------------------------------------------------------------------------------------------
# Host side: block sizes and metadata.


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def adjust_block_sizes(block_sizes, *, seq_len_q: int, seq_len_k: int, head_dim: int):
    """Checks that the tiles suit Triton (powers of two >= 16) and shrinks tiles longer than the sequence."""
    q_fields = ("block_q", "block_q_dkv", "block_q_dq")
    k_fields = ("block_k", "block_k_dkv", "block_k_dq")
    updates = {}
    for name in q_fields + k_fields:
        value = getattr(block_sizes, name)
        if not _is_power_of_two(value) or value < MIN_BLOCK:
            raise ValueError(f"block_sizes.{name}: the GPU (Triton) kernel needs a power of two >= 16, got {value}")
        seq_len = seq_len_q if name in q_fields else seq_len_k
        updates[name] = min(value, max(MIN_BLOCK, _next_power_of_two(seq_len)))
    if block_sizes.num_warps is None:
        updates["num_warps"] = 4 if head_dim <= 64 else 8
    return dataclasses.replace(block_sizes, **updates)


def _split_by_kind(kinds: np.ndarray, index: np.ndarray, count: np.ndarray, width: int, all_partial: bool):
    """Splits each row's non-empty tiles into partial and full lists, each padded to ``width`` (static shapes)."""
    rows = kinds.shape[0]
    out = {name: np.zeros((rows, width), np.int32) for name in ("part_index", "full_index")}
    counts = {name: np.zeros((rows,), np.int32) for name in ("part_count", "full_count")}
    for r in range(rows):
        cols = index[r, : count[r]]
        is_full = np.zeros(cols.shape, bool) if all_partial else kinds[r, cols] == mask_lib.FULL
        for kind, sel in (("part", cols[~is_full]), ("full", cols[is_full])):
            if sel.size:
                out[f"{kind}_index"][r, : sel.size] = sel
                out[f"{kind}_index"][r, sel.size :] = sel[-1]
            counts[f"{kind}_count"][r] = sel.size
    return {**out, **counts}


def prepare(fwd, dq, dkv, *, all_partial: bool) -> dict[str, np.ndarray]:
    """BlockLayouts of the (already padded) mask for the three passes -> the int arrays the kernels read.

    ``all_partial`` (set when segment ids are given) makes every non-empty tile partial, so the segment test runs
    everywhere. Index arrays are padded to the number of tiles, so their shapes depend only on the sequence lengths
    and block sizes: two masks of the same size share one compiled kernel.
    """
    meta = {"mask": fwd.padded_mask.astype(np.int8)}
    for prefix, layout in (("fwd", fwd), ("dq", dq)):
        parts = _split_by_kind(layout.kinds, layout.kv_index, layout.kv_count, layout.num_k_blocks, all_partial)
        meta.update({f"{prefix}_{name}": value for name, value in parts.items()})
    parts = _split_by_kind(dkv.kinds.T, dkv.q_index, dkv.q_count, dkv.num_q_blocks, all_partial)
    meta.update({f"dkv_{name}": value for name, value in parts.items()})
    return meta


def _compiler_params(block_sizes):
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)


# ----------------------------------------------------------------------------------------------------------------
# Kernel helpers (run inside the kernels).


def _precision(dtype):
    # float32 inputs: IEEE dots (Triton would otherwise use TF32); half types: tensor-core default.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, contract, precision):
    """``a @ b`` with float32 accumulation; contract = "nt" (a @ b.T), "tn" (a.T @ b) or "nn"."""
    dims = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[contract]
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _allowed(mask_tile, q_ids, kv_ids):
    """int8 [bq, bk] mask tile (and optional [bq], [bk] segment ids) -> bool [bq, bk]."""
    allowed = mask_tile != 0
    if q_ids is not None:
        allowed = jnp.logical_and(allowed, q_ids[:, None] == kv_ids[None, :])
    return allowed


def _visit_tiles(idx_part_ref, cnt_part, idx_full_ref, cnt_full, visit, carry):
    """Runs ``visit(tile, carry, masked=...)`` over the partial tiles, then over the full tiles."""
    carry = lax.fori_loop(0, cnt_part, lambda j, c: visit(idx_part_ref[j], c, masked=True), carry)
    return lax.fori_loop(0, cnt_full, lambda j, c: visit(idx_full_ref[j], c, masked=False), carry)


# ----------------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, sm_scale: float, block_k: int, has_segments: bool):
    full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, mask_ref, q_ref, k_ref, v_ref, *rest = refs
    if has_segments:
        q_ids_ref, kv_ids_ref, o_ref, lse_ref = rest
    else:
        (o_ref, lse_ref), q_ids_ref, kv_ids_ref = rest, None, None
    qi = pl.program_id(1)
    q = q_ref[...]  # [bq, D]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]  # [bq]
    block_q, head_dim = q.shape
    precision = _precision(q.dtype)
    qk_scale = sm_scale * LOG2_E  # base-2 softmax: exp(x) = exp2(x * log2 e)

    def visit(kj, carry, *, masked: bool):
        acc, m_prev, l_prev = carry
        k_slice = pl.ds(pl.multiple_of(kj * block_k, block_k), block_k)
        s = _dot(q, k_ref[k_slice, :], "nt", precision) * qk_scale  # [bq, bk]
        if masked:
            kv_ids = None if kv_ids_ref is None else kv_ids_ref[k_slice]
            allowed = _allowed(mask_ref[:, k_slice], q_ids, kv_ids)
            s = jnp.where(allowed, s, DEFAULT_MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # finite after the first tile
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(allowed, p, 0.0)  # a row with nothing allowed so far keeps l == 0
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        v = v_ref[k_slice, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, "nn", precision)
        return acc, m_next, l_next

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, denom = _visit_tiles(part_idx_ref, part_cnt_ref[qi], full_idx_ref, full_cnt_ref[qi], visit, carry)
    nonempty = denom > 0.0
    l_safe = jnp.where(nonempty, denom, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)  # acc == 0 on empty rows: output 0
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(l_safe), jnp.inf)  # +inf: P == 0 in the backward pass


def _table_inputs(meta, prefix: str, *, listed: int, tiles: int) -> tuple[list, list]:
    """(BlockSpecs, arrays) of a pass's four block tables (``{prefix}_full_index``, ``_full_count``,
    ``_part_index``, ``_part_count``) for a grid ``(batch * heads, tile t)``: program t reads its own index row
    ``[listed]`` and the whole count vector ``[tiles]``."""
    index_spec = pl.BlockSpec((None, listed), lambda _, t: (t, 0))
    count_spec = pl.BlockSpec((tiles,), lambda _, t: (0,))
    names = ("full_index", "full_count", "part_index", "part_count")
    return [index_spec, count_spec, index_spec, count_spec], [meta[f"{prefix}_{name}"] for name in names]


def _q_row_pass_inputs(meta, prefix: str, q, k, v, q_ids, kv_ids, *, block_q: int, num_k_blocks: int):
    """The inputs the passes over q row tiles (forward, dQ; grid ``(b * H + h, q tile)``) share, as
    ``(specs, args, segment_specs, segment_args)``: the block tables, the mask rows of the q tile, q's tile and the
    whole k / v of its kv head (``(b * H + h) // group == b * H_kv + h // group``); then the segment ids (empty
    lists without). The kernels take the segment ids after their pass's own extra inputs."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    kv_head = lambda bh: lax.div(bh, group)
    batch_of = lambda bh: lax.div(bh, num_heads)
    table_specs, table_args = _table_inputs(meta, prefix, listed=num_k_blocks, tiles=seq_q // block_q)
    kv_spec = pl.BlockSpec((None, seq_k, head_dim), lambda bh, qi: (kv_head(bh), 0, 0))
    specs = [
        *table_specs,
        pl.BlockSpec((block_q, seq_k), lambda bh, qi: (qi, 0)),  # mask rows of this q tile
        pl.BlockSpec((None, block_q, head_dim), lambda bh, qi: (bh, qi, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [
        *table_args,
        meta["mask"],
        q.reshape(batch * num_heads, seq_q, head_dim),
        k.reshape(batch * num_kv_heads, seq_k, head_dim),
        v.reshape(batch * num_kv_heads, seq_k, head_dim),
    ]
    if q_ids is None:
        return specs, args, [], []
    segment_specs = [
        pl.BlockSpec((None, block_q), lambda bh, qi: (batch_of(bh), qi)),
        pl.BlockSpec((None, seq_k), lambda bh, qi: (batch_of(bh), 0)),
    ]
    return specs, args, segment_specs, [q_ids, kv_ids]


def forward(q, k, v, q_segment_ids, kv_segment_ids, meta, *, sm_scale: float, block_sizes, interpret: bool):
    """q ``[B, H, Lq, D]``, k/v ``[B, H_kv, Lk, D]`` (lengths padded to tile multiples) -> (out, lse ``[B, H, Lq]``).

    ``lse`` is the base-2 logsumexp of the scaled logits (``+inf`` on rows with nothing to attend).
    """
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    block_q, block_k = block_sizes.block_q, block_sizes.block_k
    num_q_blocks, num_k_blocks = seq_q // block_q, seq_k // block_k
    has_segments = q_segment_ids is not None

    specs, args, seg_specs, seg_args = _q_row_pass_inputs(
        meta, "fwd", q, k, v, q_segment_ids, kv_segment_ids, block_q=block_q, num_k_blocks=num_k_blocks
    )
    in_specs = specs + seg_specs
    args = args + seg_args
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, block_k=block_k, has_segments=has_segments)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch * num_heads, num_q_blocks),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, head_dim), lambda bh, qi: (bh, qi, 0)),
            pl.BlockSpec((None, block_q), lambda bh, qi: (bh, qi)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch * num_heads, seq_q, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch * num_heads, seq_q), jnp.float32),
        ],
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(*args)
    return out.reshape(batch, num_heads, seq_q, head_dim), lse.reshape(batch, num_heads, seq_q)


# ----------------------------------------------------------------------------------------------------------------
# Backward.


def _dkv_kernel(*refs, sm_scale: float, block_q: int, group: int, has_segments: bool):
    full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, *rest = refs
    lse_ref, delta_ref, *rest = rest
    if has_segments:
        q_ids_ref, kv_ids_ref, dk_ref, dv_ref = rest
    else:
        (dk_ref, dv_ref), q_ids_ref, kv_ids_ref = rest, None, None
    ki = pl.program_id(1)
    k = k_ref[...]  # [bk, D]
    v = v_ref[...]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]  # [bk]
    precision = _precision(k.dtype)
    qk_scale = sm_scale * LOG2_E

    def visit_head(g, carry):
        def visit(qi, carry, *, masked: bool):
            dk, dv = carry
            q_slice = pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)
            q = q_ref[g, q_slice, :]  # [bq, D]
            do = do_ref[g, q_slice, :]
            lse = lse_ref[g, q_slice]  # [bq]
            delta = delta_ref[g, q_slice]
            p = jnp.exp2(_dot(q, k, "nt", precision) * qk_scale - lse[:, None])  # [bq, bk]
            if masked:
                q_ids = None if q_ids_ref is None else q_ids_ref[q_slice]
                p = jnp.where(_allowed(mask_ref[q_slice, :], q_ids, kv_ids), p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, "tn", precision)  # [bk, D]
            ds = p * (_dot(do, v, "nt", precision) - delta[:, None])  # [bq, bk]
            dk = dk + _dot(ds.astype(q.dtype), q, "tn", precision)
            return dk, dv

        return _visit_tiles(part_idx_ref, part_cnt_ref[ki], full_idx_ref, full_cnt_ref[ki], visit, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, visit_head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, sm_scale: float, block_k: int, has_segments: bool):
    full_idx_ref, full_cnt_ref, part_idx_ref, part_cnt_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, *rest = refs
    lse_ref, delta_ref, *rest = rest
    if has_segments:
        q_ids_ref, kv_ids_ref, dq_ref = rest
    else:
        (dq_ref,), q_ids_ref, kv_ids_ref = rest, None, None
    qi = pl.program_id(1)
    q = q_ref[...]  # [bq, D]
    do = do_ref[...]
    lse = lse_ref[...]  # [bq]
    delta = delta_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]
    precision = _precision(q.dtype)
    qk_scale = sm_scale * LOG2_E

    def visit(kj, dq, *, masked: bool):
        k_slice = pl.ds(pl.multiple_of(kj * block_k, block_k), block_k)
        k = k_ref[k_slice, :]
        v = v_ref[k_slice, :]
        p = jnp.exp2(_dot(q, k, "nt", precision) * qk_scale - lse[:, None])  # [bq, bk]
        if masked:
            kv_ids = None if kv_ids_ref is None else kv_ids_ref[k_slice]
            p = jnp.where(_allowed(mask_ref[:, k_slice], q_ids, kv_ids), p, 0.0)
        ds = p * (_dot(do, v, "nt", precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, "nn", precision)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _visit_tiles(part_idx_ref, part_cnt_ref[qi], full_idx_ref, full_cnt_ref[qi], visit, dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def backward(
    q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, meta, *, sm_scale: float, block_sizes, interpret: bool
):
    """Gradients (dq, dk, dv) of the forward pass, in the dtypes of q, k, v."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    has_segments = q_segment_ids is not None
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, H, Lq]
    params = _compiler_params(block_sizes)

    # dK/dV: grid over (batch * kv head, k tile); the q heads of the group live in one block.
    bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
    nq, nk = seq_q // bq, seq_k // bk
    grouped = lambda x: x.reshape(batch * num_kv_heads, group, *x.shape[2:])
    batch_of = lambda b_kv: lax.div(b_kv, num_kv_heads)
    table_specs, table_args = _table_inputs(meta, "dkv", listed=nq, tiles=nk)
    in_specs = [
        *table_specs,
        pl.BlockSpec((seq_q, bk), lambda b_kv, ki: (0, ki)),  # mask columns of this k block
        pl.BlockSpec((None, group, seq_q, head_dim), lambda b_kv, ki: (b_kv, 0, 0, 0)),  # q
        pl.BlockSpec((None, bk, head_dim), lambda b_kv, ki: (b_kv, ki, 0)),  # k
        pl.BlockSpec((None, bk, head_dim), lambda b_kv, ki: (b_kv, ki, 0)),  # v
        pl.BlockSpec((None, group, seq_q, head_dim), lambda b_kv, ki: (b_kv, 0, 0, 0)),  # dO
        pl.BlockSpec((None, group, seq_q), lambda b_kv, ki: (b_kv, 0, 0)),  # lse
        pl.BlockSpec((None, group, seq_q), lambda b_kv, ki: (b_kv, 0, 0)),  # delta
    ]
    args = [
        *table_args,
        meta["mask"],
        grouped(q),
        k.reshape(batch * num_kv_heads, seq_k, head_dim),
        v.reshape(batch * num_kv_heads, seq_k, head_dim),
        grouped(d_out),
        grouped(lse),
        grouped(delta),
    ]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, seq_q), lambda b_kv, ki: (batch_of(b_kv), 0)),
            pl.BlockSpec((None, bk), lambda b_kv, ki: (batch_of(b_kv), ki)),
        ]
        args += [q_segment_ids, kv_segment_ids]
    kv_spec = pl.BlockSpec((None, bk, head_dim), lambda b_kv, ki: (b_kv, ki, 0))
    kv_shape = jax.ShapeDtypeStruct((batch * num_kv_heads, seq_k, head_dim), k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=bq, group=group, has_segments=has_segments),
        grid=(batch * num_kv_heads, nk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[kv_shape, jax.ShapeDtypeStruct(kv_shape.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(*args)

    # dQ: grid over (batch * head, q tile).
    bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
    nq, nk = seq_q // bq, seq_k // bk
    specs, args, seg_specs, seg_args = _q_row_pass_inputs(
        meta, "dq", q, k, v, q_segment_ids, kv_segment_ids, block_q=bq, num_k_blocks=nk
    )
    q_spec, row_spec = specs[5], pl.BlockSpec((None, bq), lambda bh, qi: (bh, qi))
    flat = lambda x: x.reshape(batch * num_heads, *x.shape[2:])
    in_specs = [*specs, q_spec, row_spec, row_spec, *seg_specs]  # + dO, lse, delta
    args = [*args, flat(d_out), flat(lse), flat(delta), *seg_args]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, block_k=bk, has_segments=has_segments),
        grid=(batch * num_heads, nq),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((batch * num_heads, seq_q, head_dim), q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(*args)
    return (
        dq.reshape(q.shape),
        dk.reshape(k.shape),
        dv.reshape(v.shape),
    )
