"""The attention op shared by the generators, with three backends.

`attention(q, k, v, *, mask, scale, backend)` is the entry point the generators call; q `[B, H, Lq, D]`, k / v
`[B, Hkv, Lk, D]` with `H % Hkv == 0` (grouped-query: query head h reads kv head h // (H / Hkv)), an optional boolean
mask broadcastable to `[Lq, Lk]` (True = may attend), shared by the batch and the heads. Backends:

- `"xla"`: `dot_product_attention` below, the dense masked softmax (full `[Lq, Lk]` logits, masked entries -inf),
  grouped kv heads read in place.
- `"cudnn"`: `jax.nn.dot_product_attention(..., implementation="cudnn")` (cuDNN flash attention; NVIDIA GPU only,
  bfloat16 / float16 only). No mask, an all-True mask, or the square causal mask map onto cuDNN's own masks (the
  causal one skips the upper triangle); any other mask is passed as JAX's boolean `mask` argument, which JAX turns
  into a dense additive bias (no tile skipping) - or, on a JAX without that argument, is a ValueError.
- `"pallas"`: `pallas_kernels.block_sparse_attention`, which skips the tiles the mask leaves empty. The mask must be
  static (numpy, or a concrete array): its tile layout is planned on the host at trace time, so a traced mask is a
  ValueError. `interpret=None` runs the kernels in Pallas interpret mode when JAX's default backend is the CPU.
  Under a mesh with logical axis rules (`jaxgen.parallel.partition.activation_rules`) the kernel runs inside
  `jax.shard_map`, each device on its own batch x heads slice (XLA cannot partition the Pallas custom call).

Logits and softmax run in float32 whatever the input dtype (all three). The output is `[B, H, Lq, D]` in v's dtype
and carries the logical axes ('batch', 'heads', 'length', 'kv') (a no-op outside a mesh, see
`jaxgen.models.layers.constrain`). A query row that may attend to nothing is NaN with `xla` (softmax of an all -inf
row), 0 with `pallas`, and the mean of v with a `cudnn` bias mask; the generators never build such rows.

`axial_attention(q, k, v, *, axis, causal, scale, backend)` is the same op along one axis of an image grid (the Axial
Transformer's row and column attention): q / k / v `[B, H, W, N, D]`. With 'xla' and 'cudnn' the other axis is
folded into the batch and `attention` runs with the causal mask (or none); 'pallas' is
`pallas_kernels.axial_attention`, the flash kernel that folds the grid itself and skips the masked tiles.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from jaxgen.parallel.logical import constrain
from jaxgen.parallel.partition import fit_spec
from pallas_kernels.block_sparse_attention import mask as mask_lib

BACKENDS = ("xla", "cudnn", "pallas")
MASKS = ("causal", "scale_causal", "scale_block_diagonal", "full")
_OUT_AXES = ("batch", "heads", "length", "kv")


def dot_product_attention(
    q_bhld: Float[Array, "B H Lq D"],
    k_bkld: Float[Array, "B Hkv Lk D"],
    v_bkld: Float[Array, "B Hkv Lk D"],
    *,
    mask_ll: np.ndarray | jax.Array | None = None,
    scale: float = 1.0,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """softmax(scale * q k^T, masked) v -> `[B, H, Lq, D]` in the dtype of `v`: the dense "xla" backend, the one
    dense attention of every model. Grouped kv heads (Hkv divides H) are read in place, without repeating them:
    query head h reads kv head h // (H / Hkv) (torch's `repeat_interleave`). `mask_ll`: bool, True = may attend,
    broadcastable to `[Lq, Lk]` (or to `[B, Hkv, H / Hkv, Lq, Lk]`). Logits and softmax in float32. `dropout_rate`
    > 0 (training; needs `dropout_rng`): inverted dropout on the attention probabilities, as Flax's attention."""
    b, h, lq, d = q_bhld.shape
    kvh = k_bkld.shape[1]
    q = q_bhld.reshape(b, kvh, h // kvh, lq, d)
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q, k_bkld, preferred_element_type=jnp.float32) * np.float32(scale)
    if mask_ll is not None:
        logits = jnp.where(jnp.asarray(mask_ll), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(v_bkld.dtype)
    out = jnp.einsum("bkgqs,bksd->bkgqd", weights, v_bkld).reshape(b, h, lq, d)
    return constrain(out, _OUT_AXES)


def attention_mask(kind: str, seq_len: int, scale_sides: Sequence[int] | None = None) -> np.ndarray:
    """The static `[L, L]` bool self-attention mask a generator config names (`attn_mask`), True = may attend:

    - "causal": token i sees tokens j <= i (LlamaGen);
    - "scale_causal": a token sees its own scale and every coarser one (VAR); needs `scale_sides`;
    - "scale_block_diagonal": a token sees only its own scale (HMAR's Markov mask); needs `scale_sides`;
    - "full": every token sees every token (bidirectional: MaskGIT).

    The masks come from `pallas_kernels.block_sparse_attention.mask`, so the dense and the block-sparse backends
    read the same array."""
    if kind not in MASKS:
        raise ValueError(f"attention mask {kind!r}: use one of {', '.join(MASKS)}")
    if kind == "causal":
        return np.asarray(mask_lib.causal(seq_len))
    if kind == "full":
        return np.asarray(mask_lib.full(seq_len))
    if not scale_sides:
        raise ValueError(
            f"attention mask {kind!r} needs a multi-scale token layout (patch_nums); use 'causal' or 'full'"
        )
    if sum(p * p for p in scale_sides) != seq_len:
        raise ValueError(f"attention mask {kind!r}: scales {tuple(scale_sides)} hold {sum(p * p for p in scale_sides)} "
                         f"tokens, not {seq_len}")  # fmt: skip
    build = mask_lib.scale_causal if kind == "scale_causal" else mask_lib.scale_block_diagonal
    return np.asarray(build(tuple(scale_sides)))


def check_mask(kind: str, allowed: Sequence[str], where: str) -> str:
    """`kind` if it is one of `allowed` (the masks a model supports), else a ValueError naming the config field."""
    if kind not in allowed:
        raise ValueError(f"{where}={kind!r}: this model supports {', '.join(repr(a) for a in allowed)}")
    return kind


def check_backend(backend: str, where: str = "attention") -> str:
    """`backend` if it names one of `BACKENDS`, else a ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {backend!r}; expected one of 'xla', 'cudnn', 'pallas'")
    return backend


def _platform() -> str:
    """JAX's default backend ('cpu', 'gpu', 'tpu'); one place, so tests can stand in a GPU."""
    return jax.default_backend()


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _static_mask(mask, lq: int, lk: int) -> np.ndarray:
    """A concrete mask -> numpy bool `[Lq, Lk]` (broadcast)."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        arr = arr != 0
    try:
        return np.broadcast_to(arr, (lq, lk))
    except ValueError as e:
        raise ValueError(f"attention: mask of shape {arr.shape} does not broadcast to [Lq, Lk] = [{lq}, {lk}]") from e


def _cudnn_takes_mask() -> bool:
    return "mask" in inspect.signature(jax.nn.dot_product_attention).parameters


def _cudnn(q, k, v, mask, scale: float):
    platform = _platform()
    if platform != "gpu":
        raise ValueError(
            f"attention backend 'cudnn' runs only on an NVIDIA GPU (cuDNN flash attention), but JAX's default backend "
            f"is {platform!r}; use backend 'xla' or 'pallas' there"
        )
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"attention backend 'cudnn' needs bfloat16 or float16 q / k / v, got {jnp.dtype(q.dtype)}; run the model "
            f"with dtype='bfloat16' or use backend 'xla' or 'pallas'"
        )
    lq, lk = q.shape[2], k.shape[2]
    is_causal, mask_arg = False, None
    if mask is not None:
        if _is_traced(mask):
            mask_arg = jnp.broadcast_to(jnp.asarray(mask, bool), (lq, lk))
        else:
            mask_np = _static_mask(mask, lq, lk)
            if mask_np.all():
                pass
            elif lq == lk and np.array_equal(mask_np, np.tri(lq, dtype=bool)):
                is_causal = True
            else:
                mask_arg = jnp.asarray(mask_np)
        if mask_arg is not None:
            if not _cudnn_takes_mask():
                raise ValueError(
                    f"attention backend 'cudnn': this JAX ({jax.__version__}) passes only no mask or a causal mask to "
                    f"cuDNN, and this [{lq}, {lk}] mask is neither; use backend 'xla' or 'pallas' for it"
                )
    mask_kw = {} if mask_arg is None else {"mask": mask_arg[None, None]}  # [1, 1, Lq, Lk]: over batch and heads
    out = jax.nn.dot_product_attention(
        jnp.swapaxes(q, 1, 2),  # jax.nn takes [B, L, H, D]; GQA (fewer kv heads) is native
        jnp.swapaxes(k, 1, 2),
        jnp.swapaxes(v, 1, 2),
        scale=float(scale),
        is_causal=is_causal,
        implementation="cudnn",
        **mask_kw,
    )
    return constrain(jnp.swapaxes(out, 1, 2).astype(v.dtype), _OUT_AXES)


def _pallas(q, k, v, mask, scale: float, interpret: bool | None):
    from pallas_kernels.block_sparse_attention import block_sparse_attention

    lq, lk = q.shape[2], k.shape[2]
    if mask is None:
        mask_np = np.ones((lq, lk), bool)
    elif _is_traced(mask):
        raise ValueError(
            "attention backend 'pallas' needs a static mask (numpy, known at trace time: the block-sparse kernel "
            "plans its tiles on the host), but this mask is a traced JAX value; use backend 'xla' for a "
            "data-dependent mask"
        )
    else:
        mask_np = np.ascontiguousarray(_static_mask(mask, lq, lk))
    if interpret is None:
        interpret = _platform() == "cpu"
    kernel = functools.partial(block_sparse_attention, mask=mask_np, sm_scale=float(scale), interpret=bool(interpret))
    plan = _shard_plan(q, k)
    if plan is None:
        out = kernel(q, k, v)
    else:
        mesh, q_spec, kv_spec = plan
        if kv_spec[1] != q_spec[1]:  # kv heads do not split like q's: give every shard its q heads' kv heads
            k, v = (jnp.repeat(t, q.shape[1] // k.shape[1], axis=1) for t in (k, v))
            kv_spec = q_spec
        out = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(
            q, k, v
        )
    return constrain(out.astype(v.dtype), _OUT_AXES)


def _shard_plan(q, k) -> tuple[jax.sharding.AbstractMesh, PartitionSpec, PartitionSpec] | None:
    """Under a mesh with logical axis rules (`jaxgen.parallel.partition.activation_rules`): the mesh and the
    `[B, H, L, D]` (or axial `[B, H, R, C, D]`) partition specs of q and of k / v that split batch and heads as the
    'batch' and 'heads' rules say (mesh axes that do not divide a size dropped; the other dimensions whole, as the
    kernel needs every key of its rows). None outside a mesh or when nothing would be split.

    The Pallas call is a custom call that XLA's partitioner cannot split, so without this it would gather q / k / v
    onto every device and run the whole attention there; under `shard_map` each device runs the kernel on its own
    batch x heads slice, which needs no communication at all."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    batch_heads = nn.logical_to_mesh_axes(("batch", "heads"), rules)
    spec = PartitionSpec(*batch_heads, *(None,) * (q.ndim - 2))
    q_spec, kv_spec = fit_spec(spec, q.shape, mesh), fit_spec(spec, k.shape, mesh)
    if all(entry is None for entry in q_spec):
        return None
    return mesh, q_spec, kv_spec


def _pad_head_dim(x: jax.Array, size: int) -> jax.Array:
    extra = size - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _kernel_head_dim(d: int) -> int:
    """The head dim the axial kernel runs at: the next power of two, at least its minimum (16)."""
    from pallas_kernels.axial_attention.ops import MAX_HEAD_DIM, MIN_HEAD_DIM

    size = max(MIN_HEAD_DIM, 1 << max(d - 1, 0).bit_length())
    if size > MAX_HEAD_DIM:
        raise ValueError(f"axial attention backend 'pallas': head dim {d} is above the kernel's {MAX_HEAD_DIM}")
    return size


def _axial_pallas(q, k, v, axis: str, causal: bool, scale: float, interpret: bool | None):
    """`pallas_kernels.axial_attention` on `[B, H, W, N, D]`: the kernel's `[B, N, H, W, D']` layout with D zero-padded
    to D' (a power of two >= 16: padded q / k columns add 0 to every logit, padded v columns are sliced off), inside
    `shard_map` over batch and heads under a mesh with logical axis rules."""
    from pallas_kernels.axial_attention import axial_attention as kernel_op

    d = q.shape[-1]
    size = _kernel_head_dim(d)
    if interpret is None:
        interpret = _platform() == "cpu"
    to_kernel = lambda x: _pad_head_dim(jnp.transpose(x, (0, 3, 1, 2, 4)), size)
    kernel = functools.partial(kernel_op, axis=axis, causal=causal, sm_scale=float(scale), interpret=bool(interpret))
    q5, k5, v5 = (to_kernel(x) for x in (q, k, v))
    plan = _shard_plan(q5, k5)
    if plan is None:
        out = kernel(q5, k5, v5)
    else:
        mesh, spec, _ = plan
        out = jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q5, k5, v5)
    return jnp.transpose(out[..., :d], (0, 2, 3, 1, 4)).astype(v.dtype)


def axial_attention(
    q_bhwnd: Float[Array, "B H W N D"],
    k_bhwnd: Float[Array, "B H W N D"],
    v_bhwnd: Float[Array, "B H W N D"],
    *,
    axis: str,
    causal: bool,
    scale: float,
    backend: str = "xla",
    interpret: bool | None = None,
) -> Float[Array, "B H W N D"]:
    """softmax(scale * q k^T) v along one axis of an image grid -> `[B, H, W, N, D]` in v's dtype. q / k / v are
    channels-last grids with N heads of D. `axis` "row": position (h, w) attends to (h, w') of its row; "col": to
    (h', w) of its column. `causal`: along that axis only to positions <= its own. `backend`: 'xla' | 'cudnn' fold the
    other axis into the batch and call `attention` (the causal `[L, L]` mask or none); 'pallas' runs
    `pallas_kernels.axial_attention` (any head dim up to 256: it is zero-padded to the kernel's power of two)."""
    check_backend(backend, "axial attention")
    if axis not in ("row", "col"):
        raise ValueError(f"axial attention: axis must be 'row' (over W) or 'col' (over H), got {axis!r}")
    for name, x in (("q", q_bhwnd), ("k", k_bhwnd), ("v", v_bhwnd)):
        if x.ndim != 5 or x.shape != q_bhwnd.shape:
            raise ValueError(f"axial attention: {name} must be [B, H, W, N, D] like q {tuple(q_bhwnd.shape)}, "
                             f"got {tuple(x.shape)}")  # fmt: skip
    if backend == "pallas":
        return _axial_pallas(q_bhwnd, k_bhwnd, v_bhwnd, axis, causal, scale, interpret)
    b, h, w, n, d = q_bhwnd.shape
    # fold to sequences [B * other, N, L, D]: rows are (b, h) with L = W, columns (b, w) with L = H
    perm = (0, 1, 3, 2, 4) if axis == "row" else (0, 2, 3, 1, 4)
    length = w if axis == "row" else h
    fold = lambda x: jnp.transpose(x, perm).reshape(-1, n, length, d)
    mask = np.tri(length, dtype=bool) if causal else None
    out = attention(fold(q_bhwnd), fold(k_bhwnd), fold(v_bhwnd), mask=mask, scale=scale, backend=backend)
    out = out.reshape(b, h if axis == "row" else w, n, length, d)
    return jnp.transpose(out, (0, 1, 3, 2, 4) if axis == "row" else (0, 3, 1, 2, 4))


def attention(
    q_bhld: Float[Array, "B H Lq D"],
    k_bhld: Float[Array, "B Hkv Lk D"],
    v_bhld: Float[Array, "B Hkv Lk D"],
    *,
    mask: np.ndarray | jax.Array | None = None,
    scale: float,
    backend: str = "xla",
    interpret: bool | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """softmax(scale * q k^T, masked) v -> `[B, H, Lq, D]` in v's dtype, by `backend` ('xla' | 'cudnn' | 'pallas';
    see the module docstring for what each accepts). `interpret` only concerns 'pallas' (None: interpret mode on
    CPU). `dropout_rate` > 0 (dropout on the probabilities, with `dropout_rng`) runs only on 'xla'. Raises ValueError
    for an unknown backend, 'cudnn' off an NVIDIA GPU or in float32, a traced mask with 'pallas', and dropout off
    'xla'."""
    check_backend(backend)
    for name, x in (("q", q_bhld), ("k", k_bhld), ("v", v_bhld)):
        if x.ndim != 4:
            raise ValueError(f"attention: {name} must be [B, H, L, D], got shape {tuple(x.shape)}")
    h, hkv = q_bhld.shape[1], k_bhld.shape[1]
    if v_bhld.shape[1] != hkv or hkv < 1 or h % hkv:
        raise ValueError(
            f"attention: k / v heads ({hkv}, {v_bhld.shape[1]}) must be equal and divide q's {h} heads (grouped-query)"
        )
    if dropout_rate > 0 and (backend != "xla" or dropout_rng is None):
        raise ValueError(
            f"attention: dropout on the probabilities needs backend 'xla' and a dropout_rng (got backend {backend!r})"
        )
    if backend == "xla":
        return dot_product_attention(
            q_bhld, k_bhld, v_bhld, mask_ll=mask, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    if backend == "cudnn":
        return _cudnn(q_bhld, k_bhld, v_bhld, mask, scale)
    return _pallas(q_bhld, k_bhld, v_bhld, mask, scale, interpret)
