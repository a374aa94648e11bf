"""TPU (Mosaic) block-sparse attention kernels (``kernel_tpu``), run in Pallas interpret mode on CPU.

Forward (out, logsumexp) and gradients (dq, dk, dv) against ``reference.attention_reference`` on small shapes, plus
the host-side block tables, the TPU tile rules and a lowering of the real (non-interpret) kernels to Mosaic.

Tolerances. float32: kernels and reference both accumulate in float32 (matmuls at "highest", see conftest), so
only the summation order differs: measured max |err| <= 1.5e-6 on outputs and gradients of size ~1-5; asserted at
1e-5 (forward) / 2e-5 (gradients). bfloat16: q, k, v, dO are bf16 and the reference runs in float32 on those same
values, while the kernels feed the MXU bf16 probabilities and dS (relative rounding 2^-9) and return bf16 results
(one more rounding; at |x| in [4, 8) one bf16 ulp is 2^-5 = 0.031). Measured max |err| <= 8e-3 on outputs (|out|
<= 3) and <= 2e-2 on gradients (|dv| up to 5, summed over 2 GQA heads); asserted at 2e-2 / 6e-2 absolute, about
one and two ulps of the largest entries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_attention import kernel_tpu as kt
from pallas_kernels.block_sparse_attention import mask as mask_lib
from pallas_kernels.block_sparse_attention.reference import attention_reference

TOLS = {  # dtype -> (forward atol, gradient atol)
    jnp.float32: (1e-5, 2e-5),
    jnp.bfloat16: (2e-2, 6e-2),
}


def _pad_mask(mask, seq_q: int, seq_k: int) -> np.ndarray:
    arr = mask_lib.as_bool_array(mask)
    out = np.zeros((seq_q, seq_k), bool)
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out


def _meta(padded: np.ndarray, bs: kt.BlockSizes) -> dict[str, np.ndarray]:
    layout = lambda bq, bk: mask_lib.block_layout(padded, bq, bk)
    return kt.prepare(
        layout(bs.block_q, bs.block_k),
        layout(bs.block_q_dq, bs.block_k_dq),
        layout(bs.block_q_dkv, bs.block_k_dkv),
        all_partial=False,
    )


def _lse_reference(q, k, allowed, sm_scale):
    group = q.shape[1] // k.shape[1]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, jnp.repeat(k, group, axis=1), precision="highest") * sm_scale
    lse = jax.nn.logsumexp(jnp.where(allowed, s, -jnp.inf), axis=-1)
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # the kernels' convention for empty rows


def _check_case(
    mask,
    *,
    block_sizes: kt.BlockSizes,
    heads=(2, 2),
    head_dim=32,
    dtype=jnp.float32,
    batch=1,
    segments=False,
    interpret=True,
    seed=0,
):
    """Pads ``mask`` to the tiles, runs forward + backward and compares with the reference (float32 math)."""
    num_heads, num_kv_heads = heads
    arr = mask_lib.as_bool_array(mask)
    tile_q = math.lcm(*(getattr(block_sizes, n) for n in kt.Q_FIELDS))
    tile_k = math.lcm(*(getattr(block_sizes, n) for n in kt.K_FIELDS))
    seq_q, seq_k = -(-arr.shape[0] // tile_q) * tile_q, -(-arr.shape[1] // tile_k) * tile_k
    padded = _pad_mask(arr, seq_q, seq_k)
    meta = _meta(padded, block_sizes)
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, num_heads, seq_q, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, num_kv_heads, seq_k, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, num_kv_heads, seq_k, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    q_ids = kv_ids = None
    allowed = jnp.asarray(padded)[None, None]
    if segments:
        ids = jax.random.randint(keys[4], (batch, max(seq_q, seq_k)), 0, 2).sort(axis=-1)
        q_ids, kv_ids = ids[:, :seq_q], ids[:, :seq_k]
        allowed = allowed & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    sm_scale = 1.0 / math.sqrt(head_dim)
    kw = dict(sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)

    @jax.jit
    def run(q, k, v, d_out, q_ids, kv_ids):
        out, lse = kt.forward(q, k, v, q_ids, kv_ids, meta, **kw)
        return (out, lse), kt.backward(q, k, v, q_ids, kv_ids, out, lse, d_out, meta, **kw)

    (out, lse), grads = run(q, k, v, d_out, q_ids, kv_ids)

    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    seg = None if q_ids is None else (q_ids, kv_ids)
    ref = lambda q, k, v: attention_reference(q, k, v, padded, sm_scale=sm_scale, segment_ids=seg)
    ref_out, vjp = jax.vjp(ref, *f32[:3])
    ref_grads = vjp(f32[3])
    ref_lse = _lse_reference(f32[0], f32[1], allowed, sm_scale)

    fwd_tol, grad_tol = TOLS[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    errors = {"out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))}
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=fwd_tol, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=max(fwd_tol, 1e-4), rtol=1e-5)
    for name, got, want, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32)))), name
        errors[name] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=grad_tol, rtol=0, err_msg=name)
    empty_rows = ~np.asarray(allowed).any(-1)  # [B or 1, 1, Lq]
    empty_rows = np.broadcast_to(empty_rows, q.shape[:3])
    assert np.all(np.asarray(out, np.float32)[empty_rows] == 0.0)
    assert np.all(np.asarray(grads[0], np.float32)[empty_rows] == 0.0)
    assert np.all(np.isposinf(np.asarray(lse)[empty_rows]))
    return errors


def _block_diagonal(seq_len: int, block: int) -> np.ndarray:
    ids = np.arange(seq_len) // block
    return ids[:, None] == ids[None, :]


def _holes(seq_len: int) -> np.ndarray:
    """Causal with an all-False row (5) inside a partial tile, and the whole last q tile(s) (>= 32) all False, so
    that q block 2 has no tile at all (kv_count 0) and k block 2 is attended by no one (q_count 0)."""
    arr = np.tri(seq_len, dtype=bool)
    arr[5] = False
    arr[32:] = False
    return arr


CASES = {
    # name: (mask, kwargs of _check_case)
    "causal": (mask_lib.causal(64), dict(block_sizes=kt.BlockSizes.uniform(16))),
    # GQA (2 q heads per kv head) with a different tile shape in each pass, so each pass has its own tables.
    "causal_gqa_mixed_tiles": (mask_lib.causal(48), dict(block_sizes=kt.BlockSizes(16, 8, 8, 16, 16, 8), heads=(4, 2))),
    # L = 30 padded to 32: the 2 padding rows are all-False rows.
    "var_scale_causal": (mask_lib.scale_causal((1, 2, 3, 4)), dict(block_sizes=kt.BlockSizes.uniform(8), head_dim=64)),
    "block_diagonal": (_block_diagonal(48, 16), dict(block_sizes=kt.BlockSizes.uniform(16))),  # no partial tile
    "empty_rows": (_holes(48), dict(block_sizes=kt.BlockSizes.uniform(16))),
    "segments": (mask_lib.causal(32), dict(block_sizes=kt.BlockSizes.uniform(8, 16), batch=2, segments=True)),
}


@pytest.mark.parametrize(
    "name", ["causal_gqa_mixed_tiles", "var_scale_causal", "block_diagonal", "empty_rows", "segments"]
)
def test_float32_matches_reference(name):
    mask, kwargs = CASES[name]
    _check_case(mask, **kwargs)


@pytest.mark.parametrize("name", ["causal", "var_scale_causal"])
def test_bfloat16_matches_reference(name):
    mask, kwargs = CASES[name]
    _check_case(mask, dtype=jnp.bfloat16, **kwargs)


def test_tpu_semantics_interpreter():
    """``pltpu.InterpretParams``: the TPU interpreter (DMA semantics, uninitialised memory = NaN) also agrees."""
    _check_case(
        mask_lib.scale_causal((1, 2, 3, 4)),
        block_sizes=kt.BlockSizes(8, 8, 8, 16, 16, 8),
        heads=(2, 1),
        interpret=pltpu.InterpretParams(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Host-side tables and tile rules.


def test_pass_tables_follow_the_layout():
    padded = _pad_mask(mask_lib.scale_causal((1, 2, 3, 4)), 32, 32)
    layout = mask_lib.block_layout(padded, 8, 16)
    for transpose in (False, True):
        t = kt.pass_tables(layout, transpose=transpose)
        index_2d = np.asarray(layout.q_index if transpose else layout.kv_index)
        rows, slots = index_2d.shape
        np.testing.assert_array_equal(t["index"].reshape(rows, slots), index_2d)
        kinds = layout.kinds.T if transpose else layout.kinds
        for r in range(rows):
            for s in range(slots):
                pos = r * slots + s
                if s >= t["count"][r]:
                    assert t["kind"][pos] == kt.EMPTY
                    continue
                c = t["index"][pos]
                assert t["kind"][pos] == kinds[r, c] != kt.EMPTY
                if t["kind"][pos] == kt.PARTIAL:  # the tile held in VMEM is this slot's mask tile
                    qb, kb = (c, r) if transpose else (r, c)
                    tile = padded[qb * 8 : (qb + 1) * 8, kb * 16 : (kb + 1) * 16]
                    np.testing.assert_array_equal(t["tiles"][t["mask_next"][pos]], tile.T if transpose else tile)


def test_causal_tiles_are_deduplicated_and_fetched_once():
    """A causal mask with square tiles has one distinct partial tile: every grid step holds tile 0 (no re-DMA)."""
    t = kt.pass_tables(mask_lib.block_layout(mask_lib.causal(64), 16, 16), transpose=False)
    assert t["tiles"].shape == (1, 16, 16)
    np.testing.assert_array_equal(t["tiles"][0], np.tri(16, dtype=np.int32))
    assert np.all(t["mask_next"] == 0)
    empty = kt.pass_tables(mask_lib.block_layout(np.ones((32, 32), bool), 16, 16), transpose=True)
    assert empty["tiles"].shape == (0, 16, 16) and np.all(empty["kind"] == kt.FULL)


def test_adjust_block_sizes_makes_mosaic_tiles():
    bs = kt.adjust_block_sizes(kt.BlockSizes.uniform(64), seq_len_q=680, seq_len_k=680, head_dim=64)
    assert bs == kt.BlockSizes.uniform(128)
    short = kt.adjust_block_sizes(kt.BlockSizes(), seq_len_q=30, seq_len_k=100, head_dim=64)
    assert short == kt.BlockSizes.uniform(32, 112)
    kt.check_tpu_block_sizes(bs, 768, 768)
    kt.check_tpu_block_sizes(short, 32, 112)
    with pytest.raises(ValueError, match="block_q_dq=64"):
        kt.check_tpu_block_sizes(kt.BlockSizes(block_q_dq=64), 256, 256)
    with pytest.raises(ValueError, match="positive integer"):
        kt.BlockSizes(block_q=0)


def test_meta_for_other_tiles_is_rejected():
    padded = np.tri(32, dtype=bool)
    meta = _meta(padded, kt.BlockSizes.uniform(16))
    x = jnp.zeros((1, 1, 32, 16))
    with pytest.raises(ValueError, match="prepared with these block sizes"):
        kt.forward(x, x, x, None, None, meta, sm_scale=1.0, block_sizes=kt.BlockSizes.uniform(8), interpret=True)
    with pytest.raises(ValueError, match="on TPU every tile"):
        kt.forward(x, x, x, None, None, meta, sm_scale=1.0, block_sizes=kt.BlockSizes.uniform(16), interpret=False)


@pytest.mark.parametrize(("head_dim", "dtype"), [(64, jnp.bfloat16), (128, jnp.float32)])
def test_lowers_to_mosaic(head_dim, dtype):
    """The real kernels (interpret=False) lower to Mosaic for a TPU target: VAR-d16's 680 tokens in 128-tiles, GQA,
    segment ids. (Mosaic's own layout passes run at compile time on a TPU and are not exercised here.)"""
    padded = _pad_mask(mask_lib.scale_causal((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), 768, 768)
    bs = kt.BlockSizes.uniform(128)
    meta = _meta(padded, bs)
    x = jax.ShapeDtypeStruct((2, 4, 768, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 2, 768, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((2, 768), jnp.int32)
    lse = jax.ShapeDtypeStruct((2, 4, 768), jnp.float32)
    kw = dict(sm_scale=0.125, block_sizes=bs, interpret=False)

    def fwd_bwd(q, k, v, ids, lse, d_out):
        out, _ = kt.forward(q, k, v, ids, ids, meta, **kw)
        return out, kt.backward(q, k, v, ids, ids, out, lse, d_out, meta, **kw)

    text = jax.jit(fwd_bwd).trace(x, kv, kv, ids, lse, x).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


def test_ops_tpu_backend_in_interpret_mode():
    """``ops.block_sparse_attention(..., backend="tpu")`` drives this module through the kernel contract."""
    from pallas_kernels.block_sparse_attention import ops

    m = mask_lib.scale_causal((1, 2, 3, 4))
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, 2, 30, 32))
    k = jax.random.normal(keys[1], (1, 1, 30, 32))
    v = jax.random.normal(keys[2], (1, 1, 30, 32))
    d_out = jnp.broadcast_to(jnp.arange(32.0) / 32.0, q.shape)
    run = lambda q, k, v: ops.block_sparse_attention(q, k, v, m, interpret=True, backend="tpu")
    out, vjp = jax.vjp(run, q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, m), q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    for got, want in zip(vjp(d_out), ref_vjp(d_out), strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)
