"""Attention masks as numpy bool arrays, and the block metadata the kernels iterate over.

A mask is ``[Lq, Lk]`` bool, ``True`` where query ``i`` may attend key ``j``. Masks are plain numpy (no JAX):
they are static, built once on the host, and turned into a :class:`BlockLayout` once per (mask, block sizes).

    causal(L)                        j <= i
    full(Lq, Lk)                     everything
    sliding_window(L, window)        i - window < j <= i
    scale_causal(patch_nums)         VAR: token of scale s attends every token of scales <= s
    scale_block_diagonal(patch_nums) HMAR's Markov mask: token of scale s attends only tokens of scale s

Masks compose with ``&`` and ``|`` (also with plain numpy bool arrays, on either side) and ``~``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Values of BlockLayout.kinds.
EMPTY = 0  # no True in the tile: never visited
PARTIAL = 1  # some True: the kernel loads and applies the mask tile
FULL = 2  # all True: the kernel skips the mask


class Mask:
    """A ``[Lq, Lk]`` bool attention mask (``True`` = may attend). Immutable; ``np.asarray(mask)`` gives the array."""

    __slots__ = ("_array",)
    # Make numpy defer to Mask.__rand__/__ror__ so that `ndarray & Mask` is a Mask, not an elementwise object array.
    __array_ufunc__ = None

    def __init__(self, array):
        arr = np.array(array, dtype=bool, copy=True)
        if arr.ndim != 2:
            raise ValueError(f"mask: expected a 2-D [Lq, Lk] bool array, got shape {arr.shape}")
        arr.setflags(write=False)
        self._array = arr

    @property
    def array(self) -> np.ndarray:
        return self._array

    @property
    def shape(self) -> tuple[int, int]:
        return self._array.shape

    def __array__(self, dtype=None, copy=None):
        if dtype is None:
            return self._array.copy() if copy else self._array
        return self._array.astype(dtype)

    def _combine(self, other, op) -> Mask:
        other_arr = as_bool_array(other)
        if other_arr.shape != self.shape:
            raise ValueError(f"mask: cannot combine masks of shapes {self.shape} and {other_arr.shape}")
        return Mask(op(self._array, other_arr))

    def __and__(self, other) -> Mask:
        return self._combine(other, np.logical_and)

    __rand__ = __and__

    def __or__(self, other) -> Mask:
        return self._combine(other, np.logical_or)

    __ror__ = __or__

    def __invert__(self) -> Mask:
        return Mask(~self._array)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.shape == other.shape and bool(np.array_equal(self._array, other._array))

    def __hash__(self) -> int:
        return hash((self.shape, self._array.tobytes()))

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, density={density(self):.3f})"


def as_bool_array(mask) -> np.ndarray:
    """A ``Mask`` or array-like -> 2-D numpy bool array (no copy when already one)."""
    if isinstance(mask, Mask):
        return mask.array
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask: expected a 2-D [Lq, Lk] bool array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
            raise ValueError(f"mask: expected a bool (or 0/1 integer) array, got dtype {arr.dtype}")
        arr = arr != 0
    return arr


def density(mask) -> float:
    """Fraction of ``True`` entries."""
    arr = as_bool_array(mask)
    return float(arr.mean()) if arr.size else 0.0


def _check_length(name: str, value: int, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def full(seq_len_q: int, seq_len_k: int | None = None) -> Mask:
    """Every query attends every key."""
    seq_len_q = _check_length("seq_len_q", seq_len_q)
    seq_len_k = seq_len_q if seq_len_k is None else _check_length("seq_len_k", seq_len_k)
    return Mask(np.ones((seq_len_q, seq_len_k), dtype=bool))


def causal(seq_len: int) -> Mask:
    """Query ``i`` attends keys ``j <= i``."""
    seq_len = _check_length("seq_len", seq_len)
    return Mask(np.tri(seq_len, dtype=bool))


def sliding_window(seq_len: int, window: int) -> Mask:
    """Causal local attention: query ``i`` attends keys ``i - window < j <= i`` (itself and ``window - 1`` before)."""
    seq_len = _check_length("seq_len", seq_len)
    window = _check_length("window", window)
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return Mask((j <= i) & (j > i - window))


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
    """int32 ``[L]``, ``L = sum(p * p)``: the scale index of each token of a next-scale (VAR) sequence."""
    patch_nums = [_check_length("patch_nums", p) for p in patch_nums]
    if not patch_nums:
        raise ValueError("patch_nums: expected at least one scale, got an empty sequence")
    return np.repeat(np.arange(len(patch_nums), dtype=np.int32), [p * p for p in patch_nums])


def scale_causal(patch_nums: Sequence[int]) -> Mask:
    """VAR's block-causal mask: a token of scale ``s`` attends every token of scales ``<= s``.

    VAR's first scale (``patch_nums[0] == 1``) is the start/class-token position, so every token also attends it.
    """
    ids = scale_ids(patch_nums)
    return Mask(ids[None, :] <= ids[:, None])


def scale_block_diagonal(patch_nums: Sequence[int]) -> Mask:
    """HMAR's Markov mask: a token of scale ``s`` attends only the tokens of scale ``s``."""
    ids = scale_ids(patch_nums)
    return Mask(ids[None, :] == ids[:, None])


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Tile-level description of a mask for ``block_q x block_k`` tiles (arrays are read-only numpy).

    Compared and hashed by identity (the fields are numpy arrays); ``block_layout`` caches nothing itself.
    """

    block_q: int
    block_k: int
    num_q_blocks: int  # ceil(Lq / block_q)
    num_k_blocks: int  # ceil(Lk / block_k)
    kinds: np.ndarray  # int8 [num_q_blocks, num_k_blocks]: 0 empty, 1 partial (mask needed), 2 full
    kv_index: np.ndarray  # int32 [num_q_blocks, max_kv]: non-empty k blocks per q block, ascending, padded w/ last
    kv_count: np.ndarray  # int32 [num_q_blocks]: how many entries of kv_index are valid
    q_index: np.ndarray  # int32 [num_k_blocks, max_q]: non-empty q blocks of each k block (dK/dV pass)
    q_count: np.ndarray  # int32 [num_k_blocks]
    padded_mask: np.ndarray  # bool [num_q_blocks*block_q, num_k_blocks*block_k]: the mask padded with False

    @property
    def num_nonempty_blocks(self) -> int:
        return int(self.kv_count.sum())

    @property
    def block_density(self) -> float:
        """Fraction of tiles the kernel visits."""
        return self.num_nonempty_blocks / max(1, self.num_q_blocks * self.num_k_blocks)


def _compact_indices(nonempty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [R, C] -> (int32 [R, max(1, max count)] ascending column indices padded with the last one, int32 [R])."""
    counts = nonempty.sum(axis=1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    index = np.zeros((nonempty.shape[0], width), dtype=np.int32)
    for r in range(nonempty.shape[0]):
        cols = np.flatnonzero(nonempty[r])
        if cols.size:
            index[r, : cols.size] = cols
            index[r, cols.size :] = cols[-1]
    return index, counts


def block_layout(mask, block_q: int, block_k: int) -> BlockLayout:
    """Classify every ``block_q x block_k`` tile of ``mask`` as empty / partial / full and list the non-empty ones.

    The mask is padded with ``False`` up to block multiples, so a tile that overhangs the sequence end is at most
    partial. Rows of ``kv_index`` (``q_index``) for q (k) blocks with no non-empty tile are all 0 with count 0.
    """
    arr = as_bool_array(mask)
    block_q = _check_length("block_q", block_q)
    block_k = _check_length("block_k", block_k)
    seq_q, seq_k = arr.shape
    num_q_blocks = -(-seq_q // block_q)
    num_k_blocks = -(-seq_k // block_k)
    padded = np.zeros((num_q_blocks * block_q, num_k_blocks * block_k), dtype=bool)
    padded[:seq_q, :seq_k] = arr
    tiles = padded.reshape(num_q_blocks, block_q, num_k_blocks, block_k)
    nonempty = tiles.any(axis=(1, 3))
    full_tiles = tiles.all(axis=(1, 3))
    kinds = np.where(full_tiles, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)
    kv_index, kv_count = _compact_indices(nonempty)
    q_index, q_count = _compact_indices(nonempty.T)
    for a in (kinds, kv_index, kv_count, q_index, q_count, padded):
        a.setflags(write=False)
    return BlockLayout(
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        num_k_blocks=num_k_blocks,
        kinds=kinds,
        kv_index=kv_index,
        kv_count=kv_count,
        q_index=q_index,
        q_count=q_count,
        padded_mask=padded,
    )
