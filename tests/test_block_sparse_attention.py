"""Block-sparse attention kernels (Pallas interpret mode on CPU) against the jnp reference, forward and gradients.

Tolerances, as max |kernel - reference| / max(1, max |reference|) over each array:
* float32: 1e-5. Both sides compute in float32; they differ only in summation order (tiled online softmax with
  rescaling vs one softmax) and exp2 vs exp, i.e. a few ulp times the reduction depth. Measured: <= 5e-7.
* bfloat16: 1e-2 (outputs) / 2e-2 (gradients). The reference runs in float32 on the same bf16-rounded inputs;
  the kernel accumulates in float32 but, like flash attention, casts P and dS to bf16 before their matmuls (relative
  error 2^-9 each) and rounds its outputs to bf16 (2^-9); the gradients sum many such terms. Measured: <= 5e-3.

Run from the repository root: ``.venv/bin/python -m pytest pallas_kernels/block_sparse_attention/tests``.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (
    BlockSizes,
    attention_reference,
    block_layout,
    block_sparse_attention,
    density,
    mask,
)
from pallas_kernels.block_sparse_attention import mask as mask_lib

F32_TOL = 1e-5
BF16_TOL_OUT = 1e-2
BF16_TOL_GRAD = 2e-2
BS16 = BlockSizes.uniform(16)
PATCH_NUMS = (1, 2, 3, 4)  # L = 1 + 4 + 9 + 16 = 30


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def _inputs(seed, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype=jnp.float32):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, heads, seq_q, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, kv_heads, seq_k, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, kv_heads, seq_k, head_dim), jnp.float32)
    do = jax.random.normal(kd, (batch, heads, seq_q, head_dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, do))


def _kernel(q, k, v, m, do, **kwargs):
    kwargs.setdefault("block_sizes", BS16)
    fn = functools.partial(block_sparse_attention, mask=m, interpret=True, **kwargs)
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v), q, k, v)
    return out, vjp(do)


def _reference(q, k, v, m, do, **kwargs):
    """float32 reference on the (possibly bf16-rounded) inputs."""
    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, m, **kwargs), f32(q), f32(k), f32(v))
    return out, vjp(f32(do))


def _rel_err(actual, expected) -> float:
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.max(np.abs(actual - expected), initial=0.0) / max(1.0, np.max(np.abs(expected), initial=0.0)))


def _check(q, k, v, m, do, tol_out, tol_grad, **kwargs):
    out, grads = _kernel(q, k, v, m, do, **kwargs)
    ref_kwargs = {key: val for key, val in kwargs.items() if key in ("sm_scale", "segment_ids")}
    ref_out, ref_grads = _reference(q, k, v, m, do, **ref_kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    errs = {"out": _rel_err(out, ref_out)}
    for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        errs[name] = _rel_err(g, rg)
    assert errs["out"] <= tol_out, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= tol_grad, errs
    return out, grads, errs


def _constructor_masks(seq_len):
    return {
        "causal": mask.causal(seq_len),
        "full": mask.full(seq_len, seq_len),
        "sliding_window": mask.sliding_window(seq_len, 7),
        "scale_causal": mask.scale_causal(PATCH_NUMS),
        "scale_block_diagonal": mask.scale_block_diagonal(PATCH_NUMS),
        "composed": (mask.scale_block_diagonal(PATCH_NUMS) | mask.sliding_window(seq_len, 5))
        & ~np.eye(seq_len, dtype=bool)
        | np.eye(seq_len, k=-20, dtype=bool),
    }


# ----------------------------------------------------------------------------------------------------------------
# Masks and block metadata.


def test_mask_constructors():
    np.testing.assert_array_equal(np.asarray(mask.causal(4)), np.tri(4, dtype=bool))
    assert np.asarray(mask.full(2, 3)).all() and mask.full(2, 3).shape == (2, 3)
    sw = np.asarray(mask.sliding_window(6, 3))
    for i in range(6):
        for j in range(6):
            assert sw[i, j] == (i - 3 < j <= i)
    ids = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # patch_nums (1, 2, 3)
    np.testing.assert_array_equal(mask_lib.scale_ids((1, 2, 3)), ids)
    np.testing.assert_array_equal(np.asarray(mask.scale_causal((1, 2, 3))), ids[None, :] <= ids[:, None])
    np.testing.assert_array_equal(np.asarray(mask.scale_block_diagonal((1, 2, 3))), ids[None, :] == ids[:, None])
    assert np.asarray(mask.scale_causal((1, 2, 3)))[:, 0].all()  # everyone sees the start token
    assert mask.scale_causal(PATCH_NUMS).shape == (30, 30)


def test_mask_composition():
    c, w = mask.causal(8), mask.sliding_window(8, 2)
    eye = np.eye(8, dtype=bool)
    for combined, expected in (
        (c & w, np.asarray(w)),
        (c | w, np.asarray(c)),
        (c & eye, eye),
        (eye & c, eye),  # numpy on the left still gives a Mask
        (eye | w, np.asarray(w)),
        (~c, ~np.asarray(c)),
    ):
        assert isinstance(combined, mask.Mask)
        np.testing.assert_array_equal(np.asarray(combined), expected)
    assert density(mask.full(4, 4)) == 1.0
    assert density(mask.causal(4)) == pytest.approx(10 / 16)
    assert mask.causal(5) == mask.causal(5) and hash(mask.causal(5)) == hash(mask.causal(5))
    with pytest.raises(ValueError, match="combine"):
        _ = c & mask.causal(9)


def test_block_layout_metadata():
    # 40 x 40 with 16 x 16 tiles -> 3 x 3 tiles (the last row/column of tiles overhangs the sequence end by 8).
    m = np.zeros((40, 40), bool)
    m[0:16, 0:16] = True  # tile (0, 0) full
    m[3, 20] = True  # tile (0, 1) partial
    m[16:32, 32:40] = True  # tile (1, 2): all of its in-range part, but it overhangs -> partial
    m[35, 5] = True  # tile (2, 0) partial
    layout = block_layout(m, 16, 16)
    assert (layout.block_q, layout.block_k, layout.num_q_blocks, layout.num_k_blocks) == (16, 16, 3, 3)
    np.testing.assert_array_equal(layout.kinds, [[2, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert layout.kinds.dtype == np.int8
    np.testing.assert_array_equal(layout.kv_count, [2, 1, 1])
    np.testing.assert_array_equal(layout.kv_index, [[0, 1], [2, 2], [0, 0]])  # padded by repeating the last one
    assert layout.kv_index.dtype == np.int32 and layout.kv_count.dtype == np.int32
    np.testing.assert_array_equal(layout.q_count, [2, 1, 1])
    np.testing.assert_array_equal(layout.q_index, [[0, 2], [0, 0], [1, 1]])
    assert layout.padded_mask.shape == (48, 48)
    np.testing.assert_array_equal(layout.padded_mask[:40, :40], m)
    assert not layout.padded_mask[40:].any() and not layout.padded_mask[:, 40:].any()
    assert layout.num_nonempty_blocks == 4

    # Overhanging tiles of a full mask are partial; an all-empty q block has count 0 and index 0.
    full_layout = block_layout(mask.full(40, 40), 16, 16)
    np.testing.assert_array_equal(full_layout.kinds, [[2, 2, 1], [2, 2, 1], [1, 1, 1]])
    empty_row = np.ones((32, 32), bool)
    empty_row[16:] = False
    el = block_layout(empty_row, 16, 16)
    np.testing.assert_array_equal(el.kv_count, [2, 0])
    np.testing.assert_array_equal(el.kv_index[1], [0, 0])
    # Non-square tiles, and a layout for VAR-d24's L = 2240.
    lay = block_layout(mask.causal(40), 8, 32)
    assert (lay.num_q_blocks, lay.num_k_blocks) == (5, 2)
    np.testing.assert_array_equal(lay.kv_count, [1, 1, 1, 1, 2])
    var = mask.scale_causal((1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    assert var.shape == (2240, 2240)
    lay = block_layout(var, 64, 64)
    assert lay.num_q_blocks == 35 and lay.padded_mask.shape == (2240, 2240)
    assert lay.kv_count[-1] == 35 and lay.kv_count[0] == 2  # rows 30..63 are scale 4 (tokens 30..65)


# ----------------------------------------------------------------------------------------------------------------
# Kernel vs reference.


@pytest.mark.parametrize("name", list(_constructor_masks(30)))
def test_masks_float32_gqa(name):
    q, k, v, do = _inputs(0, 1, 4, 2, 30, 30, 16)  # GQA: H = 4, H_kv = 2
    _check(q, k, v, _constructor_masks(30)[name], do, F32_TOL, F32_TOL)


@pytest.mark.parametrize("name", ["causal", "scale_causal", "scale_block_diagonal", "composed"])
def test_masks_bfloat16(name):
    q, k, v, do = _inputs(1, 1, 4, 2, 30, 30, 16, jnp.bfloat16)
    _check(q, k, v, _constructor_masks(30)[name], do, BF16_TOL_OUT, BF16_TOL_GRAD)


def test_odd_length_mixed_tiles_mqa():
    # L = 37, H_kv = 1 (multi-query), D = 32, different tiles per pass: padded to lcm of the tiles (64).
    bs = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
    q, k, v, do = _inputs(2, 2, 2, 1, 37, 37, 32)
    for m in (mask.causal(37), mask.sliding_window(37, 10)):
        _check(q, k, v, m, do, F32_TOL, F32_TOL, block_sizes=bs, sm_scale=0.3)


def test_cross_attention_default_block_sizes():
    q, k, v, do = _inputs(3, 1, 2, 2, 20, 37, 16)
    m = mask.full(20, 37) & np.broadcast_to(np.arange(37) % 3 != 0, (20, 37))
    _check(q, k, v, m, do, F32_TOL, F32_TOL, block_sizes=None)  # 64-tiles shrink to 32 / 64


def test_segment_ids():
    q, k, v, do = _inputs(4, 2, 4, 2, 30, 30, 16)
    seg = jnp.array([[0] * 10 + [1] * 12 + [2] * 8, [5] * 30], jnp.int32)
    m = mask.causal(30)
    _check(q, k, v, m, do, F32_TOL, F32_TOL, segment_ids=seg)
    # The pair form (q ids, kv ids); reversed kv ids leave many rows with nothing to attend.
    _check(q, k, v, m, do, F32_TOL, F32_TOL, segment_ids=(seg, seg[:, ::-1]))


def test_inside_user_jit():
    # The mask is closed over as a static numpy constant; its metadata is built once, at trace time.
    q, k, v, _ = _inputs(0, 1, 4, 2, 30, 30, 16)
    m = mask.scale_causal(PATCH_NUMS)
    fn = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, m, block_sizes=BS16, interpret=True))
    assert _rel_err(fn(q, k, v), attention_reference(q, k, v, m)) <= F32_TOL


def test_empty_blocks_never_visited():
    # The first k tile (keys 0..15) is empty for every q tile, and so is the whole first q tile. NaN-poisoning
    # them proves the kernels never read them: a visit, even masked, would turn 0 * NaN into NaN.
    seq_len = 30
    m = np.asarray(mask.causal(seq_len)).copy()
    m[:, :16] = False
    layout = block_layout(m, 16, 16)
    assert (layout.kinds[:, 0] == 0).all() and layout.kv_count[0] == 0
    q, k, v, do = _inputs(5, 1, 4, 2, seq_len, seq_len, 16)
    poison = lambda x: x.at[:, :, :16].set(jnp.nan)
    out, (dq, dk, dv) = _kernel(poison(q), poison(k), poison(v), m, do)
    ref_out, (rdq, rdk, rdv) = _reference(q, k, v, m, do)
    assert _rel_err(out, ref_out) <= F32_TOL
    for g, rg in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert _rel_err(g, rg) <= F32_TOL
    assert not np.asarray(out[:, :, :16]).any() and not np.asarray(dq[:, :, :16]).any()
    assert not np.asarray(dk[:, :, :16]).any() and not np.asarray(dv[:, :, :16]).any()


@st.composite
def _block_sparse_masks(draw, seq_len=61, tile=16):
    """Per 16x16 tile: empty, full or random partial; then a few rows (and columns) wiped to nothing."""
    n = -(-seq_len // tile)
    kinds = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=n * n, max_size=n * n))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    m = np.zeros((n * tile, n * tile), bool)
    for t, kind in enumerate(kinds):
        i, j = divmod(t, n)
        block = np.ones((tile, tile), bool) if kind == 2 else rng.random((tile, tile)) < 0.3 * kind
        m[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = block
    m = m[:seq_len, :seq_len]
    m[draw(st.lists(st.integers(0, seq_len - 1), max_size=6)), :] = False
    m[:, draw(st.lists(st.integers(0, seq_len - 1), max_size=6))] = False
    return m


@hypothesis.settings(max_examples=6, deadline=None, database=None, derandomize=True)
@hypothesis.given(m=_block_sparse_masks())
def test_random_block_sparse_masks(m):
    q, k, v, do = _inputs(6, 1, 2, 1, 61, 61, 16)
    out, (dq, _, _), _ = _check(q, k, v, m, do, F32_TOL, F32_TOL)
    empty_rows = ~m.any(axis=1)
    # Defined behaviour: a row that may attend to nothing outputs exactly 0 and gets a zero (finite) gradient.
    assert not np.asarray(out)[:, :, empty_rows].any()
    assert not np.asarray(dq)[:, :, empty_rows].any()


def test_all_rows_empty():
    q, k, v, do = _inputs(7, 1, 2, 1, 61, 61, 16)
    out, grads = _kernel(q, k, v, np.zeros((61, 61), bool), do)
    assert not np.asarray(out).any()
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))) and not np.asarray(g).any()


# ----------------------------------------------------------------------------------------------------------------
# The GPU (Triton) path: lower for CUDA from this CPU host; no GPU needed, nothing runs.


@pytest.mark.parametrize("seq_len,segments", [(680, False), (2240, True)])
def test_triton_lowering_var_lengths(seq_len, segments):
    patch_nums = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}[seq_len]
    m = mask.scale_causal(patch_nums)
    q = jnp.zeros((1, 4, seq_len, 64), jnp.bfloat16)
    k = jnp.zeros((1, 2, seq_len, 64), jnp.bfloat16)
    seg = jnp.zeros((1, seq_len), jnp.int32) if segments else None

    def loss(q, k, v):
        return jnp.sum(block_sparse_attention(q, k, v, m, segment_ids=seg, backend="gpu").astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k)
    try:
        lowered = traced.lower(lowering_platforms=("cuda",))
    except TypeError:  # pragma: no cover - a JAX without cross-platform lowering
        pytest.skip("this JAX cannot lower for CUDA on a CPU host")
    assert lowered.as_text().count("xla.gpu.triton") == 3  # forward, dK/dV, dQ


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: a ValueError naming the argument, raised before anything is lowered.


def _bad_cases():
    q, k, v, _ = _inputs(0, 1, 4, 2, 30, 30, 16)
    m = mask.causal(30)
    f16 = lambda x: x.astype(jnp.float16)
    return (
        {
            "q rank": (dict(q=q[0]), "q: expected a 4-D"),
            "k batch": (dict(k=jnp.concatenate([k, k])), "k: batch size"),
            "v head dim": (dict(v=jnp.zeros((1, 2, 30, 32))), "v: head dim"),
            "v length": (dict(v=v[:, :, :20]), "v: sequence length"),
            "v heads": (dict(v=v[:, :1]), "v: number of kv heads"),
            "gqa heads": (dict(k=jnp.zeros((1, 3, 30, 16)), v=jnp.zeros((1, 3, 30, 16))), "k: number of kv heads"),
            "mask shape": (dict(mask=mask.causal(31)), r"mask: shape must be \(Lq, Lk\)"),
            "mask rank": (dict(mask=np.ones(30, bool)), "mask: expected a 2-D"),
            "head dim 24": (
                dict(q=jnp.zeros((1, 4, 30, 24)), k=jnp.zeros((1, 2, 30, 24)), v=jnp.zeros((1, 2, 30, 24))),
                "head dim must be a power of two",
            ),
            "head dim 8": (dict(q=q[..., :8], k=k[..., :8], v=v[..., :8]), "head dim must be a power of two"),
            "dtype int": (dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)), "q: dtype"),
            "dtype mixed": (dict(k=f16(k)), "dtypes must match"),
            "segment shape": (dict(segment_ids=jnp.zeros((1, 29), jnp.int32)), "segment_ids"),
            "segment dtype": (dict(segment_ids=jnp.zeros((1, 30), jnp.float32)), "segment_ids.*integer"),
            "segment pair": (dict(segment_ids=(jnp.zeros((1, 30), jnp.int32),)), "segment_ids"),
            "segment cross": (
                dict(k=k[:, :, :20], v=v[:, :, :20], mask=np.asarray(m)[:, :20], segment_ids=jnp.zeros((1, 30))),
                "segment_ids: a single",
            ),
            "block size": (dict(block_sizes=BlockSizes(block_q=24)), "block_sizes.block_q"),
            "block size small": (dict(block_sizes=BlockSizes.uniform(8)), "block_sizes.block_q"),
            "no interpret on cpu": (dict(interpret=False), "interpret"),
            "backend": (dict(backend="npu"), "backend"),
            "sm_scale": (dict(sm_scale=jnp.float32(2.0)), "sm_scale"),
        },
        dict(q=q, k=k, v=v, mask=m),
    )


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs(case):
    cases, base = _bad_cases()
    overrides, match = cases[case]
    args = {**base, "interpret": True, **overrides}
    if case == "no interpret on cpu" and jax.default_backend() != "cpu":
        pytest.skip("only the CPU backend needs interpret mode")
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask"), **args)


def test_bad_block_sizes_and_traced_mask():
    with pytest.raises(ValueError, match=r"block_sizes\.block_k"):
        BlockSizes(block_k=0)
    with pytest.raises(ValueError, match=r"block_sizes\.num_stages"):
        BlockSizes(num_stages=1.5)
    q, k, v, _ = _inputs(0, 1, 2, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="mask: must be a concrete"):
        jax.jit(lambda m: block_sparse_attention(q, k, v, m, interpret=True))(jnp.ones((16, 16), bool))
    with pytest.raises(ValueError, match="seq_len"):
        mask.causal(0)
    with pytest.raises(ValueError, match="window"):
        mask.sliding_window(8, 0)
