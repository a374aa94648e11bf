"""Axial attention kernels (interpret mode, CPU) against the plain-jnp reference: forward, dq/dk/dv, input checks.

Tolerances, and why:

* float32: ``atol = rtol = 1e-5``. Kernel and reference both compute in float32 with exact (HIGHEST) matmuls; they
  differ only in summation order (blocked online softmax, blocked dq/dk/dv sums), i.e. a few ulps times the sequence
  length. Measured max |error| is 1.3e-6 on values of order 1; a masking, scaling or padding bug gives errors of
  order 0.1.
* bfloat16: the reference runs in float32 on the same bf16-rounded inputs, so the comparison measures the kernel's
  own bf16 steps: probabilities and dS rounded to bf16 before their matmuls (relative 2**-9 each) and outputs and
  gradients rounded to bf16 (half an ulp: relative 2**-9). We require ``max|err| <= 2**-5 * max(1, max|ref|)``
  (about 3%, of the scale of the tensor), elementwise; measured worst is about 1.3% of scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.axial_attention import BlockSizes, axial_attention, axial_attention_reference, canonical_axis

F32_TOL = 1e-5
BF16_REL_TOL = 2.0**-5
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16)
# Query and key tiles of different sizes: the causal diagonal cuts through tiles at other offsets.
MIXED_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)


@pytest.fixture(autouse=True)
def _exact_matmuls():
    # Interpret mode lowers the kernels' dots through XLA: on a GPU backend the default f32 precision would be TF32.
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def _with_grads(fn, g):
    """Jitted ``(q, k, v) -> (fn(q, k, v), dq, dk, dv)`` for output cotangent ``g`` (one compile, not op-by-op)."""

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g.astype(out.dtype)))

    return run


def _kernel_and_reference(q, k, v, g, *, block_sizes=None, **kwargs):
    """(out, dq, dk, dv) of the kernel and of the float32 reference (on the same, possibly bf16-rounded, inputs)."""
    kernel_fn = lambda q, k, v: axial_attention(q, k, v, block_sizes=block_sizes, interpret=True, **kwargs)
    got = _with_grads(kernel_fn, g)(q, k, v)
    return got, _reference(q, k, v, g, **kwargs)


def _reference(q, k, v, g, **kwargs):
    ref_fn = lambda q, k, v: axial_attention_reference(q, k, v, **kwargs)
    return _with_grads(ref_fn, g.astype(jnp.float32))(*(x.astype(jnp.float32) for x in (q, k, v)))


def _assert_close(got, want, dtype):
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == dtype, name
        x = np.asarray(x.astype(jnp.float32))
        y = np.asarray(y)
        if dtype == jnp.float32:
            np.testing.assert_allclose(x, y, rtol=F32_TOL, atol=F32_TOL, err_msg=name)
        else:
            scale = max(1.0, float(np.max(np.abs(y))))
            np.testing.assert_allclose(x, y, rtol=0, atol=BF16_REL_TOL * scale, err_msg=name)


# Odd and even attended lengths: float32 on a 7x9 grid (rows attend over 9, columns over 7), bfloat16 on 5x12.
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(jnp.float32, (1, 2, 7, 9, 16)), (jnp.bfloat16, (2, 1, 5, 12, 16))],
    ids=["f32-7x9", "bf16-5x12"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("axis", ["row", "col"])
def test_forward_and_grads_match_reference(shape, axis, causal, dtype):
    q, k, v, g = _inputs(shape, dtype)
    got, want = _kernel_and_reference(q, k, v, g, axis=axis, causal=causal)
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    ("axis", "shape", "blocks"),
    [("row", (1, 1, 3, 37, 16), SMALL_BLOCKS), ("col", (1, 1, 37, 3, 16), MIXED_BLOCKS)],
    ids=["row-37-blocks16", "col-37-mixed"],
)
def test_several_blocks_padding_and_causal_skipping(axis, shape, blocks, causal):
    # 37 positions with 16/32-wide tiles: 2-3 blocks, the last one part padding (37 -> 64); causal runs skip the
    # blocks above the diagonal.
    q, k, v, g = _inputs(shape, jnp.float32, seed=1)
    got, want = _kernel_and_reference(q, k, v, g, axis=axis, causal=causal, block_sizes=blocks)
    _assert_close(got, want, jnp.float32)


def test_bf16_several_blocks():
    q, k, v, g = _inputs((1, 2, 3, 37, 32), jnp.bfloat16, seed=2)
    got, want = _kernel_and_reference(q, k, v, g, axis="row", causal=True, block_sizes=MIXED_BLOCKS)
    _assert_close(got, want, jnp.bfloat16)


def _loop_attention(q, k, v, axis, causal):
    """Attention written out one row (or column) at a time in numpy float64: the definition, not an einsum."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if axis == "col":
        q, k, v = (np.swapaxes(x, 2, 3) for x in (q, k, v))
    out = np.zeros_like(q)
    b, h, lines, length, d = q.shape
    for bi in range(b):
        for hi in range(h):
            for line in range(lines):
                logits = q[bi, hi, line] @ k[bi, hi, line].T / np.sqrt(d)  # [length, length]
                if causal:
                    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
                weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
                weights /= weights.sum(axis=-1, keepdims=True)
                out[bi, hi, line] = weights @ v[bi, hi, line]
    return np.swapaxes(out, 2, 3) if axis == "col" else out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("axis", ["row", "col"])
def test_matches_a_loop_over_lines(axis, causal):
    q, k, v, _ = _inputs((1, 2, 3, 5, 16), jnp.float32, seed=3)
    want = _loop_attention(q, k, v, axis, causal)
    got = axial_attention(q, k, v, axis=axis, causal=causal, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=F32_TOL, atol=F32_TOL)
    ref = axial_attention_reference(q, k, v, axis=axis, causal=causal)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=F32_TOL, atol=F32_TOL)


def test_explicit_sm_scale():
    q, k, v, _ = _inputs((1, 1, 3, 7, 32), jnp.float32, seed=5)
    got = axial_attention(q, k, v, axis="row", sm_scale=0.3, interpret=True)
    want = axial_attention_reference(q, k, v, axis="row", sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=F32_TOL, atol=F32_TOL)


@pytest.mark.parametrize(("alias", "expected"), [("row", "row"), (3, "row"), (-2, "row"), (np.int64(3), "row")])
def test_row_axis_aliases(alias, expected):
    assert canonical_axis(alias) == expected


@pytest.mark.parametrize("alias", ["col", "column", 2, -3])
def test_col_axis_aliases(alias):
    assert canonical_axis(alias) == "col"


def test_lowers_for_gpu_and_tpu():
    # No accelerator here: lowering alone runs the Triton (cuda) and Mosaic (tpu) Pallas lowering rules, and checks that
    # each platform gets its own kernels. 150 positions pad to 192, not a power of two.
    x = jax.ShapeDtypeStruct((1, 2, 150, 20, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(axial_attention(q, k, v, axis="col", causal=True).astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    triton_ok = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    cuda = jax.export.export(grads, platforms=["cuda"], disabled_checks=triton_ok)(x, x, x).mlir_module()
    tpu = jax.export.export(grads, platforms=["tpu"])(x, x, x).mlir_module()
    assert cuda.count("__gpu$xla.gpu.triton") == 3 and "tpu_custom_call" not in cuda  # fwd, dkdv, dq
    assert tpu.count("tpu_custom_call") == 3 and "xla.gpu.triton" not in tpu


def _bad(**changes):
    shape = changes.pop("shape", (1, 1, 3, 4, 16))
    dtypes = changes.pop("dtypes", (jnp.float32,) * 3)
    shapes = changes.pop("shapes", (shape,) * 3)
    q, k, v = (jnp.zeros(s, dt) for s, dt in zip(shapes, dtypes, strict=True))
    kwargs = dict(axis="row", interpret=True) | changes
    return (q, k, v), kwargs


BAD_INPUTS = {
    "rank": (_bad(shape=(1, 3, 4, 16)), r"q must have rank 5"),
    "rank_k": (_bad(shapes=((1, 1, 3, 4, 16), (1, 3, 4, 16), (1, 1, 3, 4, 16))), r"k must have rank 5"),
    "k_shape": (_bad(shapes=((1, 1, 3, 4, 16), (1, 1, 3, 5, 16), (1, 1, 3, 4, 16))), r"k\.shape must equal q\.shape"),
    "v_shape": (_bad(shapes=((1, 1, 3, 4, 16), (1, 1, 3, 4, 16), (2, 1, 3, 4, 16))), r"v\.shape must equal q\.shape"),
    "axis_name": (_bad(axis="diag"), r"axis must be 'row'.*'col'"),
    "axis_int": (_bad(axis=1), r"axis must be"),
    "axis_bool": (_bad(axis=True), r"axis must be"),
    "head_dim_not_pow2": (_bad(shape=(1, 1, 3, 4, 24)), r"head dim D .* power of two in \[16, 256\]; got 24"),
    "head_dim_small": (_bad(shape=(1, 1, 3, 4, 8)), r"head dim D .*got 8"),
    "head_dim_large": (_bad(shape=(1, 1, 3, 4, 512)), r"head dim D .*got 512"),
    "dtype_f16": (_bad(dtypes=(jnp.float16,) * 3), r"q\.dtype must be float32 or bfloat16; got float16"),
    "dtype_int": (_bad(dtypes=(jnp.float32, jnp.int32, jnp.float32)), r"k\.dtype must be float32 or bfloat16"),
    "dtype_mismatch": (
        _bad(dtypes=(jnp.float32, jnp.bfloat16, jnp.float32)),
        r"q, k and v must share one dtype.*k\.dtype=bfloat16",
    ),
    "causal": (_bad(causal="yes"), r"causal must be a Python bool"),
    "sm_scale": (_bad(sm_scale=float("nan")), r"sm_scale must be None"),
    "block_sizes": (_bad(block_sizes={"block_q": 16}), r"block_sizes must be None or a BlockSizes"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_value_error(case):
    ((q, k, v), kwargs), message = case
    with pytest.raises(ValueError, match=message):
        axial_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("value", [24, 8, 0, 16.0])
def test_bad_block_sizes(value):
    with pytest.raises(ValueError, match=r"BlockSizes\.block_k must be a power of two >= 16"):
        BlockSizes(block_k=value)


def test_block_sizes_clamp_and_pad():
    blocks = BlockSizes().clamped(37)
    assert (blocks.block_q, blocks.block_k, blocks.block_q_dq) == (64, 64, 32)
    assert blocks.padded_length(37) == 64
    assert BlockSizes().clamped(7) == BlockSizes(16, 16, 16, 16, 16, 16)
    assert BlockSizes().clamped(150).padded_length(150) == 192
