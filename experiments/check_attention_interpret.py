"""Correctness of the attention kernels at the real VAR lengths, in Pallas interpret mode (runs on a CPU).

    python experiments/check_attention_interpret.py [--out=experiments/results/attention_interpret_cpu.json]
    python experiments/check_attention_interpret.py --lists=256px --dtypes=float32   # a shorter run

The unit tests cover odd lengths up to 61; this script runs the kernels where the generators use them: VAR's scale
lists for 256 px (L = 680) and 512 px (L = 2240) with VAR's scale-causal mask, HMAR's block-diagonal mask and a
causal mask, through the public op with both kernels (`backend="gpu"`: the Triton kernels, `"tpu"`: the Mosaic
kernels, each in interpret mode), plus the axial kernel on a 32 x 32 grid (rows and columns, causal or not). Each
case compares the output and dq / dk / dv (pullback of a random cotangent) with the plain-jnp float32 reference
computed from the same (rounded) inputs, and records

    err = max |kernel - reference| / max(1, max |reference|)      per tensor

and, for scale, the same errors of jaxgen's dense `xla` backend in the same dtype (`dense_xla_errors`).

Interpret mode executes the kernels' own tiling, masking, online softmax and block skipping with XLA CPU ops, so it
checks the algorithm and the block tables at these sizes; it does not check the Triton / Mosaic compilers (the
lowering tests do that part) and its times say nothing about GPU / TPU speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import emit, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pallas_kernels, when the install maps only jaxgen

from jaxgen.models.attention import attention
from pallas_kernels.axial_attention import axial_attention
from pallas_kernels.axial_attention.reference import axial_attention_reference
from pallas_kernels.block_sparse_attention import attention_reference, block_sparse_attention
from pallas_kernels.block_sparse_attention import mask as mask_lib

SCALE_LISTS = {
    "256px": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # L = 680
    "512px": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # L = 2240
}
MASKS = {
    "var_scale_causal": mask_lib.scale_causal,
    "hmar_block_diagonal": mask_lib.scale_block_diagonal,
    "causal": lambda patch_nums: mask_lib.causal(sum(p * p for p in patch_nums)),
}
# Pass / fail bars, on err above. float32: both sides accumulate in float32 in another order (~1e-6 measured in the
# unit tests). bfloat16: the kernel feeds bf16 probabilities / ds to its second matmuls where the reference stays in
# float32: a few bf16 ulps (2^-8 = 3.9e-3) of the largest value.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def _compare(kernel_fn, reference_fn, shapes, dtype, seed: int) -> dict:
    """Output and gradients of kernel_fn vs reference_fn (the reference runs in float32 on the same rounded inputs)."""
    *keys, cotangent_key = jax.random.split(jax.random.key(seed), len(shapes) + 1)
    inputs = [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes, strict=True)]
    out, pullback = jax.vjp(kernel_fn, *inputs)
    d_out = jax.random.normal(cotangent_key, out.shape, jnp.float32).astype(dtype)
    grads = pullback(d_out)
    ref, ref_pullback = jax.vjp(reference_fn, *(x.astype(jnp.float32) for x in inputs))
    ref_grads = ref_pullback(d_out.astype(jnp.float32))
    errs = {"out": _rel_err(out, ref)}
    errs.update({f"d{name}": _rel_err(g, r) for name, g, r in zip("qkv", grads, ref_grads, strict=True)})
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
    return {"errors": {k: float(f"{v:.3g}") for k, v in errs.items()}, "finite": finite}


def block_sparse_case(backend: str, mask_name: str, list_name: str, dtype: str, args) -> dict:
    patch_nums = SCALE_LISTS[list_name]
    mask = MASKS[mask_name](patch_nums)
    length = mask.shape[0]
    kv_shape = (args.batch, args.kv_heads, length, args.head_dim)
    shapes = [(args.batch, args.heads, length, args.head_dim), kv_shape, kv_shape]

    def kernel_fn(q, k, v):
        return block_sparse_attention(q, k, v, mask, interpret=True, backend=backend)

    def reference_fn(q, k, v):
        return attention_reference(q, k, v, mask)

    def dense_fn(q, k, v):  # jaxgen's default backend, for scale: its own rounding error in this dtype
        return attention(q, k, v, mask=np.asarray(mask), scale=args.head_dim**-0.5, backend="xla")

    t0 = time.perf_counter()
    row = _compare(kernel_fn, reference_fn, shapes, jnp.dtype(dtype), seed=length)
    row["dense_xla_errors"] = _compare(dense_fn, reference_fn, shapes, jnp.dtype(dtype), seed=length)["errors"]
    return dict(
        op="block_sparse_attention",
        kernel=backend,
        mask=mask_name,
        scales=list_name,
        seq_len=length,
        mask_density=round(mask_lib.density(mask), 4),
        dtype=dtype,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        **row,
        seconds=round(time.perf_counter() - t0, 1),
    )


def axial_case(axis: str, causal: bool, dtype: str, args) -> dict:
    side = args.axial_side
    shapes = [(args.batch, args.heads, side, side, args.head_dim)] * 3
    t0 = time.perf_counter()
    row = _compare(
        lambda q, k, v: axial_attention(q, k, v, axis=axis, causal=causal, interpret=True),
        lambda q, k, v: axial_attention_reference(q, k, v, axis=axis, causal=causal),
        shapes,
        jnp.dtype(dtype),
        seed=side,
    )
    return dict(
        op="axial_attention",
        axis=axis,
        causal=causal,
        grid=[side, side],
        dtype=dtype,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        **row,
        seconds=round(time.perf_counter() - t0, 1),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lists", default="256px,512px", help=f"comma list of {sorted(SCALE_LISTS)}")
    p.add_argument("--masks", default=",".join(MASKS), help=f"comma list of {list(MASKS)}")
    p.add_argument("--kernels", default="gpu,tpu", help="block-sparse kernels to run: gpu (Triton), tpu (Mosaic)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1, help="< heads: grouped-query attention")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--axial-side", type=int, default=32, help="axial grid R = C (0: skip the axial kernel)")
    p.add_argument("--out", default="experiments/results/attention_interpret_cpu.json")
    args = p.parse_args()
    unknown = set(args.lists.split(",")) - set(SCALE_LISTS)
    if unknown:
        p.error(f"--lists: unknown {sorted(unknown)}; choose from {sorted(SCALE_LISTS)}")
    results: list[dict] = []
    dtypes = args.dtypes.split(",")
    for list_name in args.lists.split(","):
        for mask_name in args.masks.split(","):
            for backend in args.kernels.split(","):
                for dtype in dtypes:
                    emit(results, block_sparse_case(backend, mask_name, list_name, dtype, args))
    if args.axial_side:
        for axis in ("row", "col"):
            for causal in (False, True):
                for dtype in dtypes:
                    emit(results, axial_case(axis, causal, dtype, args))
    for row in results:
        row["passed"] = row["finite"] and max(row["errors"].values()) <= TOLERANCE[row["dtype"]]
    failed = [r for r in results if not r["passed"]]
    write_report(
        "attention_interpret",
        args.out,
        results,
        interpret_mode=True,
        tolerance=TOLERANCE,
        error_definition="max |kernel - reference| / max(1, max |reference|), reference in float32",
        all_passed=not failed,
    )
    print(f"{len(results) - len(failed)} of {len(results)} cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
