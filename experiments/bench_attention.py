"""Attention kernels on the masks of next-scale / next-token generators: block-sparse Pallas vs dense XLA vs cuDNN.

    python experiments/bench_attention.py [--out=experiments/results/attention_h100.json] [--head-dims=64,128]
    python experiments/bench_attention.py --quick --out=/tmp/attention_quick.json   # CPU check, interpret mode

Every case runs `jaxgen.models.attention.attention(q, k, v, mask=..., backend=...)` (bf16, 16 heads, batch chosen so
that B * L ~ 16k tokens) for

- masks: VAR's scale-causal mask and HMAR's block-diagonal (same-scale) mask on VAR's 256 px scale list (L = 680)
  and 512 px list (L = 2240), and a plain causal mask of the same lengths;
- backends: `pallas` (block-sparse kernel, skips empty tiles), `xla` (dense masked softmax over all L x L logits),
  `cudnn` (only where cuDNN has the mask built in: causal; other masks are recorded "unsupported"), and
  `cudnn_bias` (jaxgen's cudnn backend on a non-causal mask: the mask as a dense additive bias, nothing skipped);
- forward, and forward + backward (`jax.vjp` then the pullback of a random cotangent: dq, dk, dv).

Throughput counts only the unmasked work: forward = 4 * B * H * nnz(mask) * D flops (two matmuls, 2 flops per
multiply-add), backward = 2.5 x forward (five matmuls), so forward + backward = 3.5 x forward (FlashAttention's
convention). The same count is used for every backend, so a dense backend is not credited for the masked entries it
computes. Times are medians of --repeats runs after a warm-up (compile excluded, reported as compile_s).
`peak_fraction` divides by the device's dense bf16 peak (table below; null for an unknown device).

--quick: tiny sizes (L = 14 and 30, 2 heads, head dim 16 and 32) so the script runs on a CPU, where the Pallas kernel
runs in interpret mode (times there say nothing about the kernel) and cuDNN is unsupported.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import device_info, emit, median_time, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pallas_kernels, when the install maps only jaxgen

from jaxgen.models.attention import attention
from pallas_kernels.block_sparse_attention import BlockSizes, block_sparse_attention
from pallas_kernels.block_sparse_attention import mask as mask_lib

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of jax's device_kind; first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

SCALE_LISTS = {
    "256px": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # L = 680
    "512px": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # L = 2240
}
QUICK_SCALE_LISTS = {"quick14": (1, 2, 3), "quick30": (1, 2, 3, 4)}
FWD_BWD_FLOP_FACTOR = 3.5  # forward (1) + backward (2.5)

# --tune candidates. Forward: (block_q, block_k, num_warps, num_stages). Backward: the square tile of the dK/dV and dQ
# passes, tried with the best forward choice (its num_warps / num_stages, which BlockSizes shares by all three kernels).
TUNE_FWD = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2),
            (128, 32, 4, 3), (64, 32, 4, 2))  # fmt: skip
TUNE_BWD = (32, 64, 128)


def peak_tflops(kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def build_masks(scale_lists: dict) -> list[tuple[str, str, np.ndarray]]:
    """(mask name, scale-list name, [L, L] bool) for the VAR, HMAR and causal masks of each list."""
    out = []
    for list_name, patch_nums in scale_lists.items():
        length = sum(p * p for p in patch_nums)
        out.append(("var_scale_causal", list_name, np.asarray(mask_lib.scale_causal(patch_nums))))
        out.append(("hmar_block_diagonal", list_name, np.asarray(mask_lib.scale_block_diagonal(patch_nums))))
        out.append(("causal", list_name, np.asarray(mask_lib.causal(length))))
    return out


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def is_causal(mask_np: np.ndarray) -> bool:
    return mask_np.shape[0] == mask_np.shape[1] and bool(np.array_equal(mask_np, np.tri(mask_np.shape[0], dtype=bool)))


def attention_fn(backend: str, mask_np, scale: float, block_sizes: BlockSizes | None = None):
    """(q, k, v) -> out through jaxgen's attention (backend xla / cudnn / pallas), or straight through the Pallas op
    with explicit tiles when `block_sizes` is given."""
    if block_sizes is not None:
        interpret = jax.default_backend() == "cpu"
        return lambda q, k, v: block_sparse_attention(
            q, k, v, mask_np, sm_scale=scale, block_sizes=block_sizes, interpret=interpret
        )
    return lambda q, k, v: attention(q, k, v, mask=mask_np, scale=scale, backend=backend)


def time_backend(backend: str, mask_np, q, k, v, d_out, repeats: int, block_sizes: BlockSizes | None = None) -> dict:
    scale = float(q.shape[-1]) ** -0.5
    f = attention_fn(backend, mask_np, scale, block_sizes)
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(lambda q, k, v, g: jax.vjp(f, q, k, v)[1](g))
    t0 = time.perf_counter()
    fwd_c = fwd.lower(q, k, v).compile()
    fwd_bwd_c = fwd_bwd.lower(q, k, v, d_out).compile()
    compile_s = time.perf_counter() - t0
    fwd_s, _ = median_time(lambda _: jax.block_until_ready(fwd_c(q, k, v)), repeats)
    fwd_bwd_s, _ = median_time(lambda _: jax.block_until_ready(fwd_bwd_c(q, k, v, d_out)), repeats)
    return {"compile_s": round(compile_s, 3), "fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s, "out": fwd_c(q, k, v)}


def case_inputs(length: int, head_dim: int, args) -> tuple[jax.Array, ...]:
    """Random q, k, v and output cotangent `[B, H, L, D]` in args.dtype, B = round(args.tokens / L)."""
    batch = max(1, round(args.tokens / length))
    keys = jax.random.split(jax.random.key(0), 4)
    return tuple(jax.random.normal(key, (batch, args.heads, length, head_dim), jnp.dtype(args.dtype)) for key in keys)


def _blocks_name(bs: BlockSizes) -> str:
    return (
        f"q{bs.block_q}k{bs.block_k}_dkv{bs.block_q_dkv}x{bs.block_k_dkv}_dq{bs.block_q_dq}x{bs.block_k_dq}"
        f"_w{bs.num_warps}s{bs.num_stages}"
    )


def _try_time(mask_np, q, k, v, d_out, repeats: int, bs: BlockSizes) -> dict:
    """One candidate's times, or its error (a tile Triton cannot fit in shared memory fails to compile)."""
    try:
        timed = time_backend("pallas", mask_np, q, k, v, d_out, repeats, block_sizes=bs)
    except Exception as e:
        return {"blocks": _blocks_name(bs), "status": "error", "error": f"{type(e).__name__}: {str(e)[:200]}"}
    timed.pop("out")
    return {"blocks": _blocks_name(bs), "status": "ok", "fwd_ms": _sig(timed["fwd_s"] * 1e3),
            "fwd_bwd_ms": _sig(timed["fwd_bwd_s"] * 1e3)}  # fmt: skip


def tune_blocks(mask_np, q, k, v, d_out, repeats: int) -> tuple[BlockSizes, list[dict]]:
    """The fastest forward tiles of TUNE_FWD (by forward time), then the fastest backward tiles of TUNE_BWD with them
    (by forward + backward time) -> (best BlockSizes, every candidate's row)."""
    trials = []
    best_fwd, best_ms = BlockSizes(), float("inf")
    for bq, bk, warps, stages in TUNE_FWD:
        bs = dataclasses.replace(BlockSizes(), block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
        row = dict(_try_time(mask_np, q, k, v, d_out, repeats, bs), stage="fwd")
        trials.append(row)
        if row["status"] == "ok" and row["fwd_ms"] < best_ms:
            best_fwd, best_ms = bs, row["fwd_ms"]
    best, best_ms = best_fwd, float("inf")
    for tile in TUNE_BWD:
        bwd_tiles = {name: tile for name in ("block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")}
        bs = dataclasses.replace(best_fwd, **bwd_tiles)
        row = dict(_try_time(mask_np, q, k, v, d_out, repeats, bs), stage="bwd")
        trials.append(row)
        if row["status"] == "ok" and row["fwd_bwd_ms"] < best_ms:
            best, best_ms = bs, row["fwd_bwd_ms"]
    return best, trials


def run_case(mask_name, list_name, mask_np, head_dim, args, peak, tuned: BlockSizes | None = None) -> list[dict]:
    length = mask_np.shape[0]
    heads = args.heads
    nnz = int(mask_np.sum())
    q, k, v, d_out = case_inputs(length, head_dim, args)
    batch = q.shape[0]
    flops_fwd = 4.0 * batch * heads * nnz * head_dim
    base = {
        "mask": mask_name,
        "scales": list_name,
        "seq_len": length,
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": args.dtype,
        "mask_density": round(nnz / length**2, 4),
        "flops_fwd": flops_fwd,
        "flops_fwd_bwd": FWD_BWD_FLOP_FACTOR * flops_fwd,
    }
    backends = ["pallas", "xla", "cudnn"] + ([] if args.no_cudnn_bias or is_causal(mask_np) else ["cudnn_bias"])
    if tuned is not None:
        backends.insert(1, "pallas_tuned")
        base["tuned_blocks"] = _blocks_name(tuned)
    rows, outs = [], {}
    for name in backends:
        row = dict(base, impl=name)
        if name == "cudnn" and not is_causal(mask_np):
            row["status"] = "unsupported"
            row["note"] = "cuDNN has no built-in mask of this structure (see the cudnn_bias row: mask as dense bias)"
            rows.append(row)
            continue
        try:
            backend = {"cudnn_bias": "cudnn", "pallas_tuned": "pallas"}.get(name, name)
            blocks = tuned if name == "pallas_tuned" else None
            timed = time_backend(backend, mask_np, q, k, v, d_out, args.repeats, block_sizes=blocks)
        except Exception as e:  # a backend the device lacks (cuDNN on CPU, ...) or a shape it rejects
            row["status"] = "unsupported" if "runs only on an NVIDIA GPU" in str(e) else "error"
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            continue
        outs[name] = timed.pop("out")
        row.update(status="ok", **timed)
        row["fwd_ms"] = _sig(row.pop("fwd_s") * 1e3)
        row["fwd_bwd_ms"] = _sig(row.pop("fwd_bwd_s") * 1e3)
        row["fwd_tflops"] = _sig(flops_fwd / row["fwd_ms"] * 1e-9)
        row["fwd_bwd_tflops"] = _sig(FWD_BWD_FLOP_FACTOR * flops_fwd / row["fwd_bwd_ms"] * 1e-9)
        if peak:
            row["fwd_peak_fraction"] = _sig(row["fwd_tflops"] / peak)
            row["fwd_bwd_peak_fraction"] = _sig(row["fwd_bwd_tflops"] / peak)
        rows.append(row)
    if "xla" in outs:  # the outputs agree (a benchmark of a wrong kernel is worthless)
        ref = outs["xla"].astype(jnp.float32)
        for name, out in outs.items():
            row = next(r for r in rows if r["impl"] == name)
            row["max_abs_diff_vs_xla"] = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    for mine in ("pallas", "pallas_tuned"):
        for other in ("xla", "cudnn", "cudnn_bias"):
            if mine in ok and other in ok:
                for mode in ("fwd", "fwd_bwd"):
                    ok[mine][f"{mode}_speedup_vs_{other}"] = round(ok[other][f"{mode}_ms"] / ok[mine][f"{mode}_ms"], 3)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU check (Pallas in interpret mode)")
    p.add_argument("--head-dims", default=None, help="comma list (default 64,128; --quick: 16,32)")
    p.add_argument("--heads", type=int, default=None, help="default 16 (--quick: 2)")
    p.add_argument("--tokens", type=int, default=None, help="batch = round(tokens / L); default 16384 (--quick: 64)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=None, help="default 10 (--quick: 2)")
    p.add_argument("--no-cudnn-bias", action="store_true", help="skip cuDNN with a non-causal mask as a dense bias")
    p.add_argument("--lists", default=None, help="comma list of scale lists (default: all of the mode's)")
    p.add_argument("--masks", default=None, help="comma list of var_scale_causal, hmar_block_diagonal, causal")
    p.add_argument(
        "--tune", action="store_true", help="sweep the Pallas tiles on VAR's mask per (L, D): adds pallas_tuned"
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    scale_lists = QUICK_SCALE_LISTS if args.quick else SCALE_LISTS
    defaults = dict(head_dims="16,32", heads=2, tokens=64, repeats=2) if args.quick else {}
    defaults = dict(dict(head_dims="64,128", heads=16, tokens=16384, repeats=10), **defaults)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    dev = device_info()
    peak = peak_tflops(dev["kind"])
    print(f"device {dev['kind']} ({dev['platform']}), dense bf16 peak {peak} TFLOP/s", flush=True)
    if args.lists:
        unknown = set(args.lists.split(",")) - set(scale_lists)
        if unknown:
            p.error(f"--lists: unknown {sorted(unknown)}; this mode has {sorted(scale_lists)}")
        scale_lists = {name: scale_lists[name] for name in args.lists.split(",")}
    cases = build_masks(scale_lists)
    if args.masks:
        unknown = set(args.masks.split(",")) - {name for name, _, _ in cases}
        if unknown:
            p.error(f"--masks: unknown {sorted(unknown)}")
        cases = [c for c in cases if c[0] in args.masks.split(",")]
    results: list[dict] = []
    tuning: list[dict] = []
    tuned: dict[tuple[str, int], BlockSizes] = {}
    for mask_name, list_name, mask_np in cases:
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            if args.tune and (list_name, head_dim) not in tuned:
                patch_nums = scale_lists[list_name]
                var_mask = np.asarray(mask_lib.scale_causal(patch_nums))
                q, k, v, d_out = case_inputs(var_mask.shape[0], head_dim, args)
                tuned[list_name, head_dim], trials = tune_blocks(var_mask, q, k, v, d_out, args.repeats)
                for trial in trials:
                    emit(tuning, dict(trial, scales=list_name, head_dim=head_dim, mask="var_scale_causal"))
            for row in run_case(mask_name, list_name, mask_np, head_dim, args, peak, tuned.get((list_name, head_dim))):
                emit(results, row)
    slug = re.sub(r"[^a-z0-9]+", "_", dev["kind"].lower()).strip("_")
    out = args.out or f"experiments/results/attention_{'quick_' if args.quick else ''}{slug}.json"
    write_report(
        "attention",
        out,
        results,
        quick=args.quick,
        peak_bf16_tflops=peak,
        peak_table_tflops=dict(PEAK_BF16_TFLOPS),
        scale_lists={k: list(v) for k, v in scale_lists.items()},
        settings=dict(heads=args.heads, head_dims=args.head_dims, tokens=args.tokens, repeats=args.repeats),
        flop_convention="fwd = 4 * B * H * nnz(mask) * D (unmasked work only); fwd+bwd = 3.5 x fwd (bwd = 2.5 x fwd)",
        interpret_mode=jax.default_backend() == "cpu",
        tuning=tuning,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
