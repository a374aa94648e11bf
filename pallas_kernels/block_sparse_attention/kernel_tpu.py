"""Block-sparse attention for TPUs: Pallas (Mosaic) kernels, forward, dQ and dK/dV, block tables as scalar prefetch.

Implements the kernel contract of ``ops.py`` (``adjust_block_sizes``, ``prepare``, ``forward``, ``backward``).
Shapes: ``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H_kv, Lk, D]`` with ``H % H_kv == 0`` (GQA: query head ``h`` reads
kv head ``h // (H // H_kv)``), already padded to multiples of every tile. Optional int32 segment ids ``[B, Lq]`` /
``[B, Lk]`` further restrict attention to equal ids. Rows that may attend to nothing output 0, get
``logsumexp = +inf`` (so that the backward's ``exp(s - lse)`` is 0) and zero gradients.

Three ``pallas_call``\\ s, each with a ``pltpu.PrefetchScalarGridSpec`` whose four scalar-prefetch operands are the
block tables of that pass (``index``, ``count``, ``kind``, ``mask_next``; 1-D int32, which SMEM holds unpadded):

* forward and dQ: grid ``(B, H, num_q_blocks, max_kv)``. Slot ``j`` of q block ``i`` visits k block
  ``index[i, j]`` (the layout's ``kv_index``), read from SMEM *inside the k/v index_maps*, so only non-empty blocks
  are DMA'd. Slots ``j >= count[i]`` are skipped with ``pl.when``; their entry repeats the last valid block, so the
  pipeline sees an unchanged block index and issues no DMA. The online softmax (``m``, ``l``, ``acc``) lives in f32
  VMEM scratch and is finalised at the row's last slot (also when the row has no block at all: output 0).
* dK/dV: grid ``(B, H_kv, num_k_blocks, H // H_kv, max_q)``: each k block iterates the q heads of its group, then
  its non-empty q blocks (``q_index``), accumulating dK/dV in f32 scratch that is written once per kv head, so GQA
  needs no reduction over heads afterwards. ``delta = rowsum(dO * O)`` is precomputed (f32, plain XLA).

Partial tiles (``kind == 1``) apply a mask tile; full tiles (``kind == 2``) take a separate branch that never reads
it. The partial tiles of the padded mask are deduplicated on the host (a causal mask with ``block_q == block_k`` has
a single distinct one) into ``int32 [num_tiles, rows, cols]`` (int32 is also Mosaic's memref type for bool);
``mask_next`` names the tile each grid step holds in VMEM: a partial slot's own tile, any other slot the next partial
slot's tile in grid order. Full and skipped steps therefore never cause a mask DMA of their own (they prefetch the
next one), and repeated identical tiles are fetched once. The dK/dV pass uses transposed tiles ``[block_k,
block_q]``: it computes ``s^T = k q^T`` so that every matmul is ``a @ b`` or ``a @ b.T`` (no in-kernel transpose).

Numerics: logits, running max/sum (lane-replicated ``[block_q, 128]`` as TPU flash attention keeps them), the
output accumulator and all gradient accumulators are float32; probabilities and dS are cast to the input dtype for
their matmuls (the MXU's bf16 path). Masked logits are ``-inf``; a row with no allowed key so far keeps
``m = -inf`` and its exponent uses ``m = 0`` instead, so no ``inf - inf`` is ever formed.

TPU tiling: row statistics use splash attention's layouts: the forward writes ``lse`` as ``[B, H, Lq, 128]``; dQ
reads ``lse``/``delta`` as ``[B, H, 1, Lq]`` rows and dK/dV as sublane-broadcast ``[B, H, 8, Lq]`` rows; segment ids
are ``[B, L, 128]`` columns and ``[B, 8, L]`` rows. A tile is therefore a lane dimension somewhere, and on a TPU
every tile must be a multiple of 128 or the whole padded length (``adjust_block_sizes`` makes them so;
``check_tpu_block_sizes`` checks). Interpret mode (``interpret=True`` or ``pltpu.InterpretParams()``) takes any
tile, which the CPU tests use.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention import mask as mask_lib

NUM_LANES = 128
NUM_SUBLANES = 8
MIN_TILE = 16  # a whole-sequence tile is rounded up to this (bf16 packs 16 rows per vreg)
EMPTY, PARTIAL, FULL = mask_lib.EMPTY, mask_lib.PARTIAL, mask_lib.FULL
Q_FIELDS = ("block_q", "block_q_dkv", "block_q_dq")
K_FIELDS = ("block_k", "block_k_dkv", "block_k_dq")
_TABLES = ("index", "count", "kind", "mask_next")

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """TPU tile sizes of the three kernels. They change speed, not results (up to float summation order).

    Attributes:
      block_q, block_k: forward tiles (one grid step = ``block_q`` queries x ``block_k`` keys).
      block_q_dkv, block_k_dkv: the dK/dV kernel (accumulates over q tiles per ``block_k_dkv`` keys).
      block_q_dq, block_k_dq: the dQ kernel (accumulates over k tiles per ``block_q_dq`` queries).

    128 matches the MXU and the 128-lane vregs; ``D`` = 64 or a multiple of 128 is typical. ``ops.BlockSizes`` (which
    also carries Triton launch parameters) works too: the kernels only read these six fields.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128

    def __post_init__(self):
        for name in Q_FIELDS + K_FIELDS:
            _check_positive(name, getattr(self, name))

    @classmethod
    def uniform(cls, block_q: int, block_k: int | None = None) -> BlockSizes:
        """The same ``(block_q, block_k)`` tiles for all three kernels."""
        block_k = block_q if block_k is None else block_k
        return cls(block_q, block_k, block_q, block_k, block_q, block_k)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"block_sizes.{name}: expected a positive integer, got {value!r}")


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------------
# Host side: block sizes and block tables.


def adjust_block_sizes(block_sizes, *, seq_len_q: int, seq_len_k: int, head_dim: int):
    """Makes the tiles legal Mosaic blocks (see the module docstring) and shrinks them for short sequences.

    Per axis (q tiles, k tiles): if the sequence, rounded up to 16, fits in the largest tile rounded up to 128, every
    tile of that axis becomes that whole (single-tile) length; otherwise every tile is rounded up to a multiple of
    128 (e.g. ``ops.BlockSizes``' default 64 becomes 128). Returns the same class as ``block_sizes``.
    """
    del head_dim  # ops validates it; any D is a whole-array minor dimension here.
    updates = {}
    for names, seq_len in ((Q_FIELDS, seq_len_q), (K_FIELDS, seq_len_k)):
        for name in names:
            _check_positive(name, getattr(block_sizes, name))
        rounded = [_round_up(getattr(block_sizes, name), NUM_LANES) for name in names]
        whole = _round_up(seq_len, MIN_TILE)
        updates.update({name: whole if whole <= max(rounded) else r for name, r in zip(names, rounded, strict=True)})
    return dataclasses.replace(block_sizes, **updates)


def check_tpu_block_sizes(block_sizes, seq_len_q: int, seq_len_k: int) -> None:
    """Raises ``ValueError`` unless every tile is a multiple of 128 or the whole padded length of its axis (the
    Mosaic rule for a block's last two dims). Checked by ``forward``/``backward`` when ``interpret`` is off."""
    bad = []
    for names, seq_len in ((Q_FIELDS, seq_len_q), (K_FIELDS, seq_len_k)):
        for name in names:
            size = getattr(block_sizes, name)
            if size % NUM_LANES and size != seq_len:
                bad.append(f"{name}={size}")
            elif size % NUM_SUBLANES:
                bad.append(f"{name}={size} (not a multiple of {NUM_SUBLANES})")
    if bad:
        raise ValueError(
            f"block_sizes: on TPU every tile must be a multiple of {NUM_LANES} or the whole padded length "
            f"(Lq={seq_len_q}, Lk={seq_len_k}); got {', '.join(bad)} (use adjust_block_sizes, or interpret mode)"
        )


def pass_tables(layout: mask_lib.BlockLayout, *, transpose: bool) -> dict[str, np.ndarray]:
    """The scalar-prefetch tables and mask tiles of one pass.

    ``transpose=False`` (forward, dQ): rows are q blocks, slots walk ``kv_index``, tiles are ``[block_q, block_k]``.
    ``transpose=True`` (dK/dV): rows are k blocks, slots walk ``q_index``, tiles are ``[block_k, block_q]``.
    Returns ``index``/``kind``/``mask_next`` int32 ``[rows * slots]`` (row-major), ``count`` int32 ``[rows]`` and
    ``tiles`` int32 ``[num_tiles, rows, cols]`` (``num_tiles == 0`` when no tile is partial).
    """
    nq, nk, bq, bk = layout.num_q_blocks, layout.num_k_blocks, layout.block_q, layout.block_k
    kinds = np.asarray(layout.kinds, np.int32)
    index = np.asarray(layout.q_index if transpose else layout.kv_index, np.int32)
    count = np.asarray(layout.q_count if transpose else layout.kv_count, np.int32)
    padded = np.asarray(layout.padded_mask, bool)
    if kinds.shape != (nq, nk) or padded.shape != (nq * bq, nk * bk):
        raise ValueError(
            f"layout: kinds {kinds.shape} / padded_mask {padded.shape} do not match {nq}x{nk} tiles of {bq}x{bk}"
        )
    tiles4 = padded.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)  # [q block, k block, bq, bk]
    if transpose:
        kinds, tiles4 = kinds.T, tiles4.transpose(1, 0, 3, 2)  # [k block, q block, bk, bq]
    num_rows, num_cols = kinds.shape
    if index.ndim != 2 or index.shape[0] != num_rows or count.shape != (num_rows,):
        raise ValueError(f"layout: index {index.shape} / count {count.shape} do not match {num_rows} rows")
    if index.shape[1] == 0:  # No non-empty tile anywhere: one skipped slot keeps the grid non-empty.
        index = np.zeros((num_rows, 1), np.int32)
    num_slots = index.shape[1]
    if count.min(initial=0) < 0 or count.max(initial=0) > num_slots:
        raise ValueError(f"layout: counts must lie in [0, {num_slots}], got {count}")
    if index.min(initial=0) < 0 or index.max(initial=0) >= num_cols:
        raise ValueError(f"layout: block indices must lie in [0, {num_cols})")
    valid = np.arange(num_slots)[None, :] < count[:, None]
    kind = np.where(valid, np.take_along_axis(kinds, index, axis=1), EMPTY).astype(np.int32)
    if np.any(valid & (kind == EMPTY)):
        raise ValueError("layout: a counted slot of the index table points at an empty tile")

    rows, slots = np.nonzero(kind == PARTIAL)  # row-major = grid order
    mask_next = np.zeros(num_rows * num_slots, np.int32)
    if rows.size:
        flat = tiles4[rows, index[rows, slots]].reshape(rows.size, -1)
        unique, inverse = np.unique(flat, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        tiles = unique.reshape(-1, *tiles4.shape[2:]).astype(np.int32)
        tile_id = np.full(num_rows * num_slots, -1, np.int64)
        tile_id[rows * num_slots + slots] = inverse
        nxt = int(inverse[0])  # after the last step the grid wraps round (next head or batch) to the first tile
        for pos in range(tile_id.size - 1, -1, -1):
            if tile_id[pos] >= 0:
                nxt = int(tile_id[pos])
            mask_next[pos] = nxt
    else:
        tiles = np.zeros((0, *tiles4.shape[2:]), np.int32)
    return {
        "index": index.reshape(-1).copy(),
        "count": count.copy(),
        "kind": kind.reshape(-1),
        "mask_next": mask_next,
        "tiles": tiles,
    }


def prepare(fwd, dq, dkv, *, all_partial: bool) -> dict[str, np.ndarray]:
    """BlockLayouts of the padded mask for the forward, dQ and dK/dV tiles -> the arrays the kernels read.

    Keys ``{fwd,dq,dkv}_{index,count,kind,mask_next,tiles}`` (see :func:`pass_tables`). ``all_partial`` (segment
    ids given) changes nothing here: when segment ids are passed the kernels test them on every visited tile, and
    load a mask tile only for the tiles that are partial in the mask itself.
    """
    del all_partial
    meta = {}
    for prefix, layout, transpose in (("fwd", fwd, False), ("dq", dq, False), ("dkv", dkv, True)):
        meta.update({f"{prefix}_{name}": value for name, value in pass_tables(layout, transpose=transpose).items()})
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Kernel helpers.


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lanes(x, n: int):
    """Lane-replicated ``[rows, 128]`` -> ``[rows, n]`` by whole-vreg tiling or a lane slice (no relayout)."""
    if n == NUM_LANES:
        return x
    if n % NUM_LANES == 0:
        return jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _allowed(mask_ref, col_ids_ref, row_ids_ref, shape):
    """bool ``shape`` = [rows, cols] of allowed logits, or None when nothing is masked. ``mask_ref``: the int32
    tile (or None); ``col_ids_ref``: ``[rows, 128]`` lane-replicated ids of the rows; ``row_ids_ref``:
    ``[8, cols]`` sublane-replicated ids of the columns (both None without segment ids)."""
    allowed = None if mask_ref is None else mask_ref[...] != 0
    if col_ids_ref is not None:
        same = _lanes(col_ids_ref[...], shape[1]) == row_ids_ref[:1, :]
        allowed = same if allowed is None else jnp.logical_and(allowed, same)
    return allowed


def _run_slot(step, *, row, slot, pos, count_ref, kind_ref, has_tiles: bool) -> None:
    """Runs ``step(positional)`` on counted slots: ``positional=True`` on partial tiles (mask tile applied), False on
    full ones (mask tile never read)."""
    valid = slot < count_ref[row]
    if not has_tiles:  # no partial tile anywhere in this pass
        pl.when(valid)(functools.partial(step, False))
        return
    kind = kind_ref[pos]
    pl.when(jnp.logical_and(valid, kind == FULL))(functools.partial(step, False))
    pl.when(jnp.logical_and(valid, kind == PARTIAL))(functools.partial(step, True))


def _pass_meta(meta, prefix: str):
    """(the four prefetch tables as int32 jax arrays, the tiles or None, rows, slots); shapes are static."""
    tables = tuple(jnp.asarray(meta[f"{prefix}_{name}"], jnp.int32) for name in _TABLES)
    tiles = meta[f"{prefix}_tiles"]
    rows = tables[1].shape[0]
    slots = tables[0].shape[0] // rows
    return tables, (None if tiles.shape[0] == 0 else jnp.asarray(tiles, jnp.int32)), rows, slots


def _segment_layouts(ids, length: int):
    """int ``[B, L]`` -> (``[B, L, 128]`` column layout, ``[B, 8, L]`` row layout), int32; or (None, None)."""
    if ids is None:
        return None, None
    ids = jnp.asarray(ids, jnp.int32)
    batch = ids.shape[0]
    return (
        jnp.broadcast_to(ids[:, :, None], (batch, length, NUM_LANES)),
        jnp.broadcast_to(ids[:, None, :], (batch, NUM_SUBLANES, length)),
    )


def _check(q, k, v, q_segment_ids, kv_segment_ids, block_sizes, interpret):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, H, Lq, D] and k, v [B, H_kv, Lk, D]; got {q.shape}, {k.shape}, {v.shape}")
    batch, num_heads, seq_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or num_heads % k.shape[1]:
        raise ValueError(f"k/v {k.shape} do not fit q {q.shape} (batch, head dim, or H % H_kv)")
    seq_k = k.shape[2]
    for names, seq_len in ((Q_FIELDS, seq_q), (K_FIELDS, seq_k)):
        for name in names:
            if seq_len % getattr(block_sizes, name):
                raise ValueError(f"block_sizes.{name}={getattr(block_sizes, name)} must divide the length {seq_len}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("segment ids: pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (batch, seq_q) or kv_segment_ids.shape != (batch, seq_k)):
        raise ValueError(f"segment ids: expected [B, Lq], [B, Lk]; got {q_segment_ids.shape}, {kv_segment_ids.shape}")
    if not interpret:
        check_tpu_block_sizes(block_sizes, seq_q, seq_k)


def _cost(q, k, *, heads: int, tiles: int, bq: int, bk: int, matmuls: int, streams: int) -> pl.CostEstimate:
    """Scheduling hint for XLA: ``tiles`` visited ``bq x bk`` tiles per head (an upper bound: the slots of the grid),
    ``matmuls`` matmuls each, ``streams`` D-wide operand tiles read or written per tile."""
    batch, _, _, head_dim = q.shape
    work = batch * heads * tiles * bq * bk
    return pl.CostEstimate(
        flops=2 * matmuls * work * head_dim,
        transcendentals=work,
        bytes_accessed=batch * heads * tiles * streams * max(bq, bk) * head_dim * q.dtype.itemsize,
    )


def _check_tables(rows: int, seq_len: int, block: int, what: str) -> None:
    if rows * block != seq_len:
        raise ValueError(
            f"meta: the {what} tables have {rows} rows, but the padded length {seq_len} has {seq_len // block} "
            f"tiles of {block}; was meta prepared with these block sizes?"
        )


# ----------------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, sm_scale: float, num_slots: int, has_tiles: bool, has_segments: bool):
    _, count_ref, kind_ref, _, q_ref, k_ref, v_ref, *rest = refs
    q_ids_ref = kv_ids_ref = mask_ref = None
    if has_segments:
        q_ids_ref, kv_ids_ref, *rest = rest  # [bq, 128], [8, bk]
    if has_tiles:
        mask_ref, *rest = rest  # int32 [bq, bk]
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest  # [bq, D], f32 [bq, 128]; scratch f32 [bq, 128] x2, [bq, D]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(positional: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT) * sm_scale  # [bq, bk] f32
        allowed = _allowed(mask_ref if positional else None, q_ids_ref, kv_ids_ref, s.shape)
        m_prev, l_prev = m_scr[...], l_scr[...]
        if allowed is not None:
            s = jnp.where(allowed, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        # Without masking every row has a finite logit; with it, a row may still have none: exponentiate around 0.
        m_use = m_next if allowed is None else jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - _lanes(m_use, s.shape[1]))
        alpha = jnp.exp(m_prev - m_use)
        m_scr[...] = m_next
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = _lanes(alpha, acc_scr.shape[1]) * acc_scr[...] + _dot(p.astype(v.dtype), v, _NN)

    _run_slot(step, row=i, slot=j, pos=i * num_slots + j, count_ref=count_ref, kind_ref=kind_ref, has_tiles=has_tiles)

    @pl.when(j == num_slots - 1)
    def _finalize():
        row_sum, row_max = l_scr[...], m_scr[...]
        empty = row_sum == 0.0
        l_safe = jnp.where(empty, 1.0, row_sum)
        o_ref[...] = (acc_scr[...] * _lanes(1.0 / l_safe, acc_scr.shape[1])).astype(o_ref.dtype)  # empty: acc = 0
        lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log(l_safe))


def _row_pass_maps(group: int, slots: int):
    """Index maps of a pass over q row tiles (forward, dQ; grid ``(b, h, q tile i, slot j)`` with the four block
    tables as scalar prefetch): ``q_map`` for blocks of the q row tile, ``kv_map`` for the k / v tile in slot j (the
    row's j-th non-empty k tile; kv head ``h // group``)."""

    def q_map(b, h, i, j, index, count, kind, mask_next):
        return b, h, i, 0

    def kv_map(b, h, i, j, index, count, kind, mask_next):
        return b, lax.div(h, group) if group > 1 else h, index[i * slots + j], 0

    return q_map, kv_map


def _row_pass_side_inputs(q_ids, kv_ids, tiles, *, bq: int, bk: int, slots: int) -> tuple[list, list]:
    """(BlockSpecs, arrays) of a row pass's optional inputs, in the kernels' order: the segment ids (q's as
    ``[bq, 128]`` lanes, the slot's kv ids as ``[8, bk]`` sublanes) and the deduplicated mask tiles (the slot's tile
    by the ``mask_next`` table). Empty lists when there are none."""
    specs, args = [], []
    if q_ids is not None:
        specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, j, index, *_: (b, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, i, j, index, *_: (b, 0, index[i * slots + j])),
        ]
        args += [_segment_layouts(q_ids, q_ids.shape[-1])[0], _segment_layouts(kv_ids, kv_ids.shape[-1])[1]]
    if tiles is not None:
        specs.append(
            pl.BlockSpec((None, bq, bk), lambda b, h, i, j, index, count, kind, nxt: (nxt[i * slots + j], 0, 0))
        )
        args.append(tiles)
    return specs, args


def forward(
    q: Float[Array, "b h lq d"],
    k: Float[Array, "b hkv lk d"],
    v: Float[Array, "b hkv lk d"],
    q_segment_ids: Int[Array, "b lq"] | None,
    kv_segment_ids: Int[Array, "b lk"] | None,
    meta,
    *,
    sm_scale: float,
    block_sizes,
    interpret=False,
) -> tuple[Float[Array, "b h lq d"], Float[Array, "b h lq"]]:
    """Forward pass -> ``(out [B, H, Lq, D] in q.dtype, lse [B, H, Lq] f32)``; ``lse`` is the natural-log
    logsumexp of the scaled logits (``+inf`` on empty rows) and is the residual :func:`backward` takes.

    ``meta``: :func:`prepare`'s dict (numpy or jax arrays). ``interpret``: False on a TPU; True (generic Pallas
    interpreter) or ``pltpu.InterpretParams()`` (TPU-semantics interpreter) elsewhere.
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids, block_sizes, interpret)
    batch, num_heads, seq_q, head_dim = q.shape
    group = num_heads // k.shape[1]
    bq, bk = block_sizes.block_q, block_sizes.block_k
    tables, tiles, rows, slots = _pass_meta(meta, "fwd")
    _check_tables(rows, seq_q, bq, "forward")
    has_segments = q_segment_ids is not None

    q_map, kv_map = _row_pass_maps(group, slots)
    side_specs, side_args = _row_pass_side_inputs(q_segment_ids, kv_segment_ids, tiles, bq=bq, bk=bk, slots=slots)
    in_specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        *side_specs,
    ]
    args = [q, k, v, *side_args]
    kernel = functools.partial(
        _fwd_kernel, sm_scale=float(sm_scale), num_slots=slots, has_tiles=tiles is not None, has_segments=has_segments
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, num_heads, rows, slots),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                pltpu.VMEM((bq, head_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, seq_q, NUM_LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, heads=num_heads, tiles=rows * slots, bq=bq, bk=bk, matmuls=2, streams=3),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(*tables, *args)
    return out, lse[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# Backward: dQ.


def _dq_kernel(*refs, sm_scale: float, num_slots: int, has_tiles: bool, has_segments: bool):
    _, count_ref, kind_ref, _, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *rest = refs  # lse/di: f32 [1, bq]
    q_ids_ref = kv_ids_ref = mask_ref = None
    if has_segments:
        q_ids_ref, kv_ids_ref, *rest = rest  # [bq, 128], [8, bk]
    if has_tiles:
        mask_ref, *rest = rest  # int32 [bq, bk]
    dq_ref, acc_scr = rest  # [bq, D], f32 [bq, D]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(positional: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, _NT) * sm_scale  # [bq, bk]
        allowed = _allowed(mask_ref if positional else None, q_ids_ref, kv_ids_ref, s.shape)
        if allowed is not None:
            s = jnp.where(allowed, s, -jnp.inf)
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))  # [bq, bk]; 0 on masked logits and on empty rows
        dp = _dot(do, v, _NT)  # [bq, bk]
        ds = p * (dp - jnp.expand_dims(di_ref[0], -1)) * sm_scale
        acc_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    _run_slot(step, row=i, slot=j, pos=i * num_slots + j, count_ref=count_ref, kind_ref=kind_ref, has_tiles=has_tiles)

    @pl.when(j == num_slots - 1)
    def _finalize():
        dq_ref[...] = acc_scr[...].astype(dq_ref.dtype)


def _backward_dq(q, k, v, do, lse, delta, q_ids, kv_ids, meta, block_sizes, sm_scale, interpret):
    batch, num_heads, seq_q, head_dim = q.shape
    group = num_heads // k.shape[1]
    bq, bk = block_sizes.block_q_dq, block_sizes.block_k_dq
    tables, tiles, rows, slots = _pass_meta(meta, "dq")
    _check_tables(rows, seq_q, bq, "dq")

    q_map, kv_map = _row_pass_maps(group, slots)
    row_map = lambda b, h, i, *_: (b, h, 0, i)  # lse / delta as [B, H, 1, Lq]
    side_specs, side_args = _row_pass_side_inputs(q_ids, kv_ids, tiles, bq=bq, bk=bk, slots=slots)
    in_specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        *side_specs,
    ]
    args = [q, k, v, do, lse[:, :, None, :], delta[:, :, None, :], *side_args]
    kernel = functools.partial(
        _dq_kernel,
        sm_scale=float(sm_scale),
        num_slots=slots,
        has_tiles=tiles is not None,
        has_segments=q_ids is not None,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, num_heads, rows, slots),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, k, heads=num_heads, tiles=rows * slots, bq=bq, bk=bk, matmuls=3, streams=3),
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(*tables, *args)


# ----------------------------------------------------------------------------------------------------------------
# Backward: dK, dV.


def _dkv_kernel(*refs, sm_scale: float, num_slots: int, group: int, has_tiles: bool, has_segments: bool):
    _, count_ref, kind_ref, _, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *rest = refs  # lse/di: f32 [8, bq]
    kv_ids_ref = q_ids_ref = mask_ref = None
    if has_segments:
        kv_ids_ref, q_ids_ref, *rest = rest  # [bk, 128], [8, bq]
    if has_tiles:
        mask_ref, *rest = rest  # int32 [bk, bq] (transposed tile)
    dk_ref, dv_ref, dk_scr, dv_scr = rest  # [bk, D] x2, f32 [bk, D] x2
    kb, g, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, j == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(positional: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = _dot(k, q, _NT) * sm_scale  # [bk, bq]
        allowed = _allowed(mask_ref if positional else None, kv_ids_ref, q_ids_ref, s_t.shape)
        if allowed is not None:
            s_t = jnp.where(allowed, s_t, -jnp.inf)
        p_t = jnp.exp(s_t - lse_ref[:1, :])  # [bk, bq]
        dv_scr[...] += _dot(p_t.astype(do.dtype), do, _NN)
        dp_t = _dot(v, do, _NT)  # [bk, bq]
        ds_t = p_t * (dp_t - di_ref[:1, :]) * sm_scale
        dk_scr[...] += _dot(ds_t.astype(q.dtype), q, _NN)

    _run_slot(step, row=kb, slot=j, pos=kb * num_slots + j, count_ref=count_ref, kind_ref=kind_ref, has_tiles=has_tiles)

    @pl.when(jnp.logical_and(g == group - 1, j == num_slots - 1))
    def _finalize():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward_dkv(q, k, v, do, lse, delta, q_ids, kv_ids, meta, block_sizes, sm_scale, interpret):
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = block_sizes.block_q_dkv, block_sizes.block_k_dkv
    tables, tiles, rows, slots = _pass_meta(meta, "dkv")
    _check_tables(rows, seq_k, bk, "dkv")

    def q_map(b, hk, kb, g, j, index, count, kind, mask_next):
        return b, hk * group + g, index[kb * slots + j], 0

    def row_map(b, hk, kb, g, j, index, count, kind, mask_next):
        return b, hk * group + g, 0, index[kb * slots + j]

    def kv_map(b, hk, kb, g, j, index, count, kind, mask_next):
        return b, hk, kb, 0

    sub = (batch, num_heads, NUM_SUBLANES, seq_q)
    in_specs = [
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bk, head_dim), kv_map),
        pl.BlockSpec((None, None, bq, head_dim), q_map),
        pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_map),
        pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_map),
    ]
    args = [q, k, v, do, jnp.broadcast_to(lse[:, :, None, :], sub), jnp.broadcast_to(delta[:, :, None, :], sub)]
    if q_ids is not None:
        in_specs += [
            pl.BlockSpec((None, bk, NUM_LANES), lambda b, hk, kb, *_: (b, kb, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b, hk, kb, g, j, index, *_: (b, 0, index[kb * slots + j])),
        ]
        args += [_segment_layouts(kv_ids, seq_k)[0], _segment_layouts(q_ids, seq_q)[1]]
    if tiles is not None:
        in_specs.append(
            pl.BlockSpec((None, bk, bq), lambda b, hk, kb, g, j, index, count, kind, nxt: (nxt[kb * slots + j], 0, 0))
        )
        args.append(tiles)
    kernel = functools.partial(
        _dkv_kernel,
        sm_scale=float(sm_scale),
        num_slots=slots,
        group=group,
        has_tiles=tiles is not None,
        has_segments=q_ids is not None,
    )
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), kv_map)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, num_kv_heads, rows, group, slots),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=_cost(q, k, heads=num_heads, tiles=rows * slots, bq=bq, bk=bk, matmuls=4, streams=2),
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(*tables, *args)


def backward(
    q: Float[Array, "b h lq d"],
    k: Float[Array, "b hkv lk d"],
    v: Float[Array, "b hkv lk d"],
    q_segment_ids: Int[Array, "b lq"] | None,
    kv_segment_ids: Int[Array, "b lk"] | None,
    out: Float[Array, "b h lq d"],
    lse: Float[Array, "b h lq"],
    d_out: Float[Array, "b h lq d"],
    meta,
    *,
    sm_scale: float,
    block_sizes,
    interpret=False,
) -> tuple[Float[Array, "b h lq d"], Float[Array, "b hkv lk d"], Float[Array, "b hkv lk d"]]:
    """Gradients ``(dq, dk, dv)`` (dtypes of q, k, v) of :func:`forward`, given its ``out`` and ``lse`` and the
    cotangent ``d_out``."""
    _check(q, k, v, q_segment_ids, kv_segment_ids, block_sizes, interpret)
    if out.shape != q.shape or d_out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"out {out.shape}, d_out {d_out.shape} must be {q.shape} and lse {lse.shape} {q.shape[:3]}")
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, H, Lq]
    lse = lse.astype(jnp.float32)
    common = (q_segment_ids, kv_segment_ids, meta, block_sizes, sm_scale, interpret)
    dq = _backward_dq(q, k, v, d_out, lse, delta, *common)
    dk, dv = _backward_dkv(q, k, v, d_out, lse, delta, *common)
    return dq, dk, dv
