"""Public op: ``block_sparse_attention`` with a custom VJP whose forward and backward are Pallas kernels.

Usage::

    from pallas_kernels.block_sparse_attention import block_sparse_attention, mask

    m = mask.scale_causal((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))  # VAR-d16: L = 680
    out = block_sparse_attention(q_bhld, k_bhld, v_bhld, m)  # q [B, H, L, D], k/v [B, H_kv, L, D]

The mask is static (numpy / :class:`mask.Mask`); its block layouts are computed once per (mask, block sizes,
padded lengths) on the host and cached. Any sequence length works: q/k/v are zero-padded to tile multiples and the
output is sliced back. Semantics, including "a row that may attend to nothing outputs 0", are those of
``reference.attention_reference``.

Backend dispatch and the kernel contract
----------------------------------------
``jax.default_backend() == "tpu"`` selects ``kernel_tpu`` (imported lazily); anything else selects ``kernel_gpu``
(the Triton lowering; on CPU it only runs with ``interpret=True``). ``backend="gpu" | "tpu"`` overrides the choice,
e.g. to run the TPU kernel in interpret mode on CPU. A kernel module provides:

``adjust_block_sizes(block_sizes, *, seq_len_q, seq_len_k, head_dim) -> BlockSizes``
    Validates the tiles for that hardware (``ValueError``) and may shrink them for short sequences.
``prepare(fwd, dq, dkv, *, all_partial) -> dict[str, np.ndarray]``
    ``fwd``/``dq``/``dkv`` are :class:`mask.BlockLayout` of the padded mask for (block_q, block_k),
    (block_q_dq, block_k_dq) and (block_q_dkv, block_k_dkv); ``all_partial`` is True when segment ids are given
    (every non-empty tile must then be masked). Returns the integer arrays the kernels read (cached by ops).
``forward(q, k, v, q_segment_ids, kv_segment_ids, meta, *, sm_scale, block_sizes, interpret) -> (out, residual)``
``backward(q, k, v, q_segment_ids, kv_segment_ids, out, residual, d_out, meta, *, sm_scale, block_sizes,
interpret) -> (dq, dk, dv)``
    q ``[B, H, Lq_pad, D]``, k/v ``[B, H_kv, Lk_pad, D]`` with ``Lq_pad``/``Lk_pad`` multiples of every q/k tile,
    segment ids int32 ``[B, Lq_pad]``/``[B, Lk_pad]`` or both None, ``meta`` = ``prepare``'s dict as jax arrays.
    ``residual`` is any array pytree the kernel's backward wants (the GPU kernel's is the base-2 logsumexp).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib
import math
import numbers
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels.block_sparse_attention import mask as mask_lib
from pallas_kernels.block_sparse_attention.reference import split_segment_ids

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KERNEL_MODULES = {"gpu": "kernel_gpu", "tpu": "kernel_tpu"}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (forward, dK/dV, dQ) and the Triton launch parameters.

    Tiles longer than the sequence are shrunk to it (next power of two, at least 16) by the GPU kernel, so the
    defaults also suit short sequences. On GPU every tile must be a power of two >= 16.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None  # None: 4 for head dim <= 64, else 8
    num_stages: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "num_warps" and value is None:
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"block_sizes.{field.name}: expected a positive integer, got {value!r}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()

    @classmethod
    def uniform(cls, block: int, **kwargs) -> BlockSizes:
        """The same tile size for every pass (e.g. ``BlockSizes.uniform(16)`` for small tests)."""
        names = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
        return cls(**{name: block for name in names}, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: the jit cache key besides shapes)."""

    backend: str
    sm_scale: float
    block_sizes: BlockSizes
    interpret: bool


def _kernel_module(backend: str):
    return importlib.import_module(f"pallas_kernels.block_sparse_attention.{_KERNEL_MODULES[backend]}")


# ----------------------------------------------------------------------------------------------------------------
# custom_vjp core (inputs already padded).


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_ids, kv_ids, meta, static: _Static):
    out, _ = _attention_fwd(q, k, v, q_ids, kv_ids, meta, static)
    return out


def _attention_fwd(q, k, v, q_ids, kv_ids, meta, static: _Static):
    out, residual = _kernel_module(static.backend).forward(
        q, k, v, q_ids, kv_ids, meta, sm_scale=static.sm_scale, block_sizes=static.block_sizes,
        interpret=static.interpret,
    )  # fmt: skip
    return out, (q, k, v, q_ids, kv_ids, meta, out, residual)


def _attention_bwd(static: _Static, residuals, d_out):
    q, k, v, q_ids, kv_ids, meta, out, residual = residuals
    dq, dk, dv = _kernel_module(static.backend).backward(
        q, k, v, q_ids, kv_ids, out, residual, d_out, meta, sm_scale=static.sm_scale,
        block_sizes=static.block_sizes, interpret=static.interpret,
    )  # fmt: skip
    return dq, dk, dv, None, None, None  # segment ids and block metadata are integer, non-differentiable


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=(6,))


# ----------------------------------------------------------------------------------------------------------------
# Block metadata cache: one host-side computation per (mask, tiles, padded lengths, backend, segments).

_META_CACHE: collections.OrderedDict = collections.OrderedDict()
_META_CACHE_SIZE = 64
_META_LOCK = threading.Lock()


def _metadata(mask_np: np.ndarray, padded_shape, block_sizes: BlockSizes, backend: str, all_partial: bool):
    digest = hashlib.blake2b(np.packbits(mask_np).tobytes(), digest_size=16).digest()
    key = (mask_np.shape, digest, padded_shape, block_sizes, backend, all_partial)
    with _META_LOCK:
        if key in _META_CACHE:
            _META_CACHE.move_to_end(key)
            return _META_CACHE[key]
    padded = np.zeros(padded_shape, dtype=bool)
    padded[: mask_np.shape[0], : mask_np.shape[1]] = mask_np
    bs = block_sizes
    meta = _kernel_module(backend).prepare(
        mask_lib.block_layout(padded, bs.block_q, bs.block_k),
        mask_lib.block_layout(padded, bs.block_q_dq, bs.block_k_dq),
        mask_lib.block_layout(padded, bs.block_q_dkv, bs.block_k_dkv),
        all_partial=all_partial,
    )
    for value in meta.values():
        value.setflags(write=False)
    with _META_LOCK:
        _META_CACHE[key] = meta
        while len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Validation.


def _check_array(name: str, x, ndim: int, layout: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array {layout}, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {layout}, got shape {tuple(x.shape)}")


def _validate(q, k, v, mask_np, q_ids, kv_ids, sm_scale):
    _check_array("q", q, 4, "[B, H, Lq, D]")
    _check_array("k", k, 4, "[B, H_kv, Lk, D]")
    _check_array("v", v, 4, "[B, H_kv, Lk, D]")
    batch, num_heads, seq_q, head_dim = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch:
            raise ValueError(f"{name}: batch size {x.shape[0]} must equal q's batch size {batch}")
        if x.shape[3] != head_dim:
            raise ValueError(f"{name}: head dim {x.shape[3]} must equal q's head dim {head_dim}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v: number of kv heads {v.shape[1]} must equal k's {k.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: sequence length {v.shape[2]} must equal k's (Lk = {k.shape[2]})")
    num_kv_heads, seq_k = k.shape[1], k.shape[2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"k: number of kv heads {num_kv_heads} must divide q's number of heads {num_heads} (grouped-query)"
        )
    if seq_q < 1 or seq_k < 1:
        raise ValueError(f"q/k: sequence lengths must be >= 1, got Lq={seq_q}, Lk={seq_k}")
    if not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
        raise ValueError(f"q: head dim must be a power of two in [16, 256] (16, 32, 64, 128, 256), got {head_dim}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise ValueError(f"{name}: dtype must be float32, bfloat16 or float16, got {jnp.dtype(x.dtype)}")
    if not (jnp.dtype(q.dtype) == jnp.dtype(k.dtype) == jnp.dtype(v.dtype)):
        raise ValueError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask_np.shape != (seq_q, seq_k):
        raise ValueError(f"mask: shape must be (Lq, Lk) = {(seq_q, seq_k)}, got {mask_np.shape}")
    for name, ids, length, layout in (
        ("segment_ids (q)", q_ids, seq_q, "[B, Lq] int32"),
        ("segment_ids (kv)", kv_ids, seq_k, "[B, Lk] int32"),
    ):
        if ids is None:
            continue
        _check_array(name, ids, 2, layout)
        if tuple(ids.shape) != (batch, length):
            raise ValueError(f"{name}: shape must be {(batch, length)}, got {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name}: dtype must be an integer type (int32), got {ids.dtype}")
    if sm_scale is not None and not (
        isinstance(sm_scale, numbers.Real) and not isinstance(sm_scale, bool) and math.isfinite(sm_scale)
    ):
        raise ValueError(f"sm_scale: expected a finite Python float or None, got {sm_scale!r}")


def _concrete_mask(mask) -> np.ndarray:
    try:
        return mask_lib.as_bool_array(mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "mask: must be a concrete numpy bool array or mask.Mask (static), got a traced JAX value"
        ) from e


def _pad_axis(x, axis: int, length: int):
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


# ----------------------------------------------------------------------------------------------------------------
# Public op.


def block_sparse_attention(
    q: Float[Array, "b h lq d"],
    k: Float[Array, "b hkv lk d"],
    v: Float[Array, "b hkv lk d"],
    mask,
    *,
    block_sizes: BlockSizes | None = None,
    sm_scale: float | None = None,
    segment_ids=None,
    interpret: bool = False,
    backend: str | None = None,
) -> Float[Array, "b h lq d"]:
    """Attention restricted to a static mask, skipping empty tiles; differentiable in q, k, v.

    Args:
      q: ``[B, H, Lq, D]`` float32 / bfloat16 / float16; D a power of two in [16, 256].
      k, v: ``[B, H_kv, Lk, D]``, same dtype; ``H % H_kv == 0`` (grouped-query attention).
      mask: ``[Lq, Lk]`` numpy bool array or :class:`mask.Mask` (``True`` = may attend); must be concrete.
      block_sizes: tiles (default ``BlockSizes()``).
      sm_scale: logit scale, default ``1 / sqrt(D)``.
      segment_ids: optional int32 ``[B, L]`` (self-attention) or pair ``([B, Lq], [B, Lk])``; q attends k only
        where the ids are equal (combined with the mask).
      interpret: run the Pallas kernels in interpret mode (needed on CPU).
      backend: ``"gpu"`` or ``"tpu"`` kernel; default from ``jax.default_backend()`` (CPU -> the GPU kernel).

    Returns:
      ``[B, H, Lq, D]`` in q's dtype; rows that may attend to nothing are 0.
    """
    mask_np = _concrete_mask(mask)
    _check_array("q", q, 4, "[B, H, Lq, D]")
    _check_array("k", k, 4, "[B, H_kv, Lk, D]")
    q_ids, kv_ids = split_segment_ids(segment_ids, q.shape[2], k.shape[2])
    _validate(q, k, v, mask_np, q_ids, kv_ids, sm_scale)
    if block_sizes is None:
        block_sizes = BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes: expected a BlockSizes or None, got {type(block_sizes).__name__}")
    if backend is None:
        platform = jax.default_backend()
        backend = "tpu" if platform == "tpu" else "gpu"
        if platform == "cpu" and not interpret:
            raise ValueError(
                "interpret: the CPU backend has no Pallas GPU/TPU lowering; pass interpret=True to run the kernels "
                "in interpret mode"
            )
    if backend not in _KERNEL_MODULES:
        raise ValueError(f"backend: expected 'gpu', 'tpu' or None, got {backend!r}")

    seq_q, head_dim, seq_k = q.shape[2], q.shape[3], k.shape[2]
    kernel = _kernel_module(backend)
    block_sizes = kernel.adjust_block_sizes(block_sizes, seq_len_q=seq_q, seq_len_k=seq_k, head_dim=head_dim)
    bs = block_sizes
    tile_q = math.lcm(bs.block_q, bs.block_q_dq, bs.block_q_dkv)
    tile_k = math.lcm(bs.block_k, bs.block_k_dq, bs.block_k_dkv)
    pad_q = -(-seq_q // tile_q) * tile_q
    pad_k = -(-seq_k // tile_k) * tile_k
    has_segments = q_ids is not None
    meta = _metadata(mask_np, (pad_q, pad_k), block_sizes, backend, has_segments)

    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    static = _Static(backend=backend, sm_scale=float(sm_scale), block_sizes=block_sizes, interpret=bool(interpret))
    q_p = _pad_axis(jnp.asarray(q), 2, pad_q)
    k_p = _pad_axis(jnp.asarray(k), 2, pad_k)
    v_p = _pad_axis(jnp.asarray(v), 2, pad_k)
    if has_segments:
        q_ids = _pad_axis(jnp.asarray(q_ids, jnp.int32), 1, pad_q)  # padded positions are masked out anyway
        kv_ids = _pad_axis(jnp.asarray(kv_ids, jnp.int32), 1, pad_k)
    meta_j = {name: jnp.asarray(value) for name, value in meta.items()}
    out = _attention_jit(q_p, k_p, v_p, q_ids, kv_ids, meta_j, static)
    return out[:, :, :seq_q]
