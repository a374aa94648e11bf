"""The Axial Transformer's speed: the axial attention op, the training step and the sampler, pallas vs xla.

    python experiments/bench_axial.py --preset=cpu --out=experiments/results/axial_bench_cpu.json
    python experiments/bench_axial.py --preset=gpu --out=$OUT/axial_gpu.json     # in experiments/gpu_suite.sh

Rows (each with its compile time apart from the median steady-state time of `--repeats` runs after a warm-up):

- `attention`: `jaxgen.models.attention.axial_attention` forward + backward (the gradient of sum(out * g) with respect
  to q, k, v) for row and column attention, causal and not, at the ImageNet 32 / 64 model shapes `[B, S, S, heads,
  hd]`; the pallas/xla ratio of these is the issue's target (>= 1.5x at 64x64 on a GPU). Every pallas row records
  its max difference from xla (outputs and gradients), so a number is never kept for a wrong kernel.
- `train`: one forward + backward of the bits-per-dim loss of `AxialTransformer` (one random channel per image, as
  training does), per backend.
- `sample`: the cached sampler (`jaxgen.sampling.axial`), (sub)pixels per second.

On a CPU the Pallas kernels run in interpret mode (a Python-level emulation, not a speed), so the cpu preset times
pallas only at a tiny shape and says so. The official code is TF1 and cannot run here (no TensorFlow).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import compile_timed, device_info, median_time, versions

from jaxgen.models.attention import axial_attention
from jaxgen.models.generators.axial import AxialConfig, AxialTransformer, bits_per_dim
from jaxgen.models.tokenizers.pixels import PixelConfig, PixelTokenizer
from jaxgen.sampling.axial import AxialSampler

# ImageNet 32 / 64 as released (D, heads, 8/8/8 layers); the cpu preset shrinks width and depth
RELEASED = {32: dict(hidden_size=1536, num_heads=16), 64: dict(hidden_size=2048, num_heads=16)}
PRESETS = {
    "gpu": dict(
        dtype="bfloat16", attn_sizes=(64, 32), train_sizes=(64, 32), layers=8, width=None, attn_batch=8,
        train_batch=4, sample=(32, 1), pallas_attn_max=64, pallas_train_max=64, repeats=5,
    ),
    "cpu": dict(
        dtype="float32", attn_sizes=(16, 32, 64), train_sizes=(8, 32, 64), layers=2, width=(64, 4), attn_batch=1,
        train_batch=2, sample=(16, 2), pallas_attn_max=16, pallas_train_max=8, repeats=3,
    ),
}  # fmt: skip


def model_config(size: int, preset: dict, backend: str) -> AxialConfig:
    d, heads = preset["width"] or (RELEASED[size]["hidden_size"], RELEASED[size]["num_heads"])  # cpu: (D, heads)
    n = preset["layers"]
    return AxialConfig(height=size, width=size, channels=3, hidden_size=d, num_heads=heads, num_outer_layers=n,
                       num_inner_layers=n, num_exterior_layers=n, dtype=preset["dtype"], attn_backend=backend,
                       res_init_scale=1.0, logits_init_scale=1.0)  # fmt: skip


def attention_rows(preset: dict, repeats: int):
    """Yields one row per (size, axis, causal, backend)."""
    rows = []
    for size in preset["attn_sizes"]:
        cfg = model_config(size, preset, "xla")
        shape = (preset["attn_batch"], size, size, cfg.num_heads, cfg.head_dim)
        dtype = jnp.dtype(preset["dtype"])
        keys = jax.random.split(jax.random.key(size), 4)
        q, k, v, g = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)
        for axis in ("row", "col"):
            for causal in (False, True):
                outs = {}
                for backend in ("xla", "pallas"):
                    if backend == "pallas" and size > preset["pallas_attn_max"]:
                        continue

                    compile_s, run_s, out, grads = time_attention(q, k, v, g, axis, causal, cfg.head_dim**-0.5,
                                                                  backend, repeats)  # fmt: skip
                    outs[backend] = (out, grads)
                    # fwd: 2 matmuls of L x L x hd per line and head; bwd: 5 more (dq, dk, dv, dp, recompute s)
                    lines = shape[0] * size * cfg.num_heads
                    flops = 7 * 2 * lines * size * size * cfg.head_dim * (0.5 if causal else 1.0)
                    row = dict(part="attention", size=size, shape=list(shape), dtype=preset["dtype"], axis=axis,
                               causal=causal, backend=backend, compile_s=round(compile_s, 3), fwd_bwd_s=run_s,
                               tflops=flops / run_s / 1e12)  # fmt: skip
                    if backend == "pallas":
                        ref_out, ref_grads = outs["xla"]
                        row["max_diff_vs_xla"] = _max_diff((out, *grads), (ref_out, *ref_grads))
                        row["speedup_vs_xla"] = next(
                            r["fwd_bwd_s"] for r in rows[::-1] if r["backend"] == "xla" and r["size"] == size
                            and r["axis"] == axis and r["causal"] == causal
                        ) / run_s  # fmt: skip
                    rows.append(row)
                    yield row


def time_attention(q, k, v, g, axis: str, causal: bool, scale: float, backend: str, repeats: int):
    """(compile s, median fwd + bwd s, output, (dq, dk, dv)) of sum(axial_attention(q, k, v) * g)."""

    def loss(q, k, v):
        out = axial_attention(q, k, v, axis=axis, causal=causal, scale=scale, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    compiled, compile_s = compile_timed(fn.lower(q, k, v))
    run_s, _ = median_time(lambda _: jax.block_until_ready(compiled(q, k, v)), repeats)
    (_, out), grads = compiled(q, k, v)
    return compile_s, run_s, out, grads


def time_train(model: AxialTransformer, params, x, repeats: int):
    """(compile s, median step s, loss) of the bits-per-dim loss's value and gradient, one channel per image."""
    b = x.shape[0]
    labels, channel = jnp.zeros((b,), jnp.int32), jnp.arange(b, dtype=jnp.int32) % x.shape[-1]

    def loss(p):
        logits = model.apply({"params": p}, labels, x, channel, method=AxialTransformer.channel_logits)
        target = jnp.take_along_axis(x, channel[:, None, None, None], axis=-1)[..., 0]
        return bits_per_dim(logits, target)[1].mean()

    compiled, compile_s = compile_timed(jax.jit(jax.value_and_grad(loss)).lower(params))
    run_s, _ = median_time(lambda _: jax.block_until_ready(compiled(params)), repeats)
    return compile_s, run_s, float(compiled(params)[0])


def _max_diff(got, want) -> float:
    """The largest |got - want| over the arrays, relative to the largest |want| of each."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)))
    return worst


def train_rows(preset: dict, repeats: int):
    rows = []
    for size in preset["train_sizes"]:
        losses = {}
        for backend in ("xla", "pallas"):
            if backend == "pallas" and size > preset["pallas_train_max"]:
                continue
            cfg = model_config(size, preset, backend)
            model = AxialTransformer(cfg)
            params = model.init(jax.random.key(0), *model.example_inputs())["params"]
            b = preset["train_batch"]
            x = jax.random.randint(jax.random.key(1), (b, size, size, 3), 0, 256)
            compile_s, run_s, value = time_train(model, params, x, repeats)
            losses[backend] = float(value)
            row = dict(part="train", size=size, batch=b, dtype=preset["dtype"], backend=backend,
                       config=dataclasses.asdict(cfg), compile_s=round(compile_s, 3), step_s=run_s,
                       images_per_s=b / run_s, loss_bits_per_dim=float(value))  # fmt: skip
            if backend == "pallas":
                row["loss_diff_vs_xla"] = abs(losses["pallas"] - losses["xla"])
            rows.append(row)
            yield row


def sample_rows(preset: dict, repeats: int):
    size, b = preset["sample"]
    cfg = model_config(size, preset, "xla")
    model = AxialTransformer(cfg)
    params = model.init(jax.random.key(0), *model.example_inputs())["params"]
    sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=3)))
    labels = np.zeros(b, np.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, {}, labels, jax.random.key(0)).pixels)
    first_s = time.perf_counter() - t0
    run_s, _ = median_time(lambda i: jax.block_until_ready(sampler(params, {}, labels, jax.random.key(i)).pixels),
                           max(1, repeats - 1))  # fmt: skip
    subpixels = b * size * size * 3
    row = dict(part="sample", size=size, batch=b, dtype=preset["dtype"], config=dataclasses.asdict(cfg),
               first_call_s=round(first_s, 3), run_s=run_s, subpixels_per_s=subpixels / run_s)  # fmt: skip
    yield row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--parts", default="attention,train,sample")
    p.add_argument("--repeats", type=int, default=0, help="0: the preset's")
    p.add_argument("--out", default="")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    repeats = args.repeats or preset["repeats"]
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for part, fn in (("attention", attention_rows), ("train", train_rows), ("sample", sample_rows)):
        if part not in parts:
            continue
        for row in fn(preset, repeats):  # the JSON is rewritten after every row: a time limit keeps what finished
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            rows.append(row)
            report = make_report(args, preset, rows, time.perf_counter() - t0)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"attention_speedup_pallas_vs_xla": report["attention_speedup_pallas_vs_xla"],
                      "wall_s": report["wall_s"]}))  # fmt: skip


def make_report(args, preset: dict, rows: list[dict], wall_s: float) -> dict:
    ratios = {f"{r['axis']}_{'causal' if r['causal'] else 'full'}_{r['size']}px": r["speedup_vs_xla"]
              for r in rows if r["part"] == "attention" and "speedup_vs_xla" in r}  # fmt: skip
    return {
        "command": f"python experiments/bench_axial.py --preset={args.preset} --parts={args.parts}"
        + (f" --repeats={args.repeats}" if args.repeats else ""),
        "device": device_info(),
        "versions": versions(),
        "preset": dict(preset),
        "note": "on a CPU the Pallas kernels run in interpret mode (an emulation): pallas rows there are correctness "
        "checks at a tiny shape, not speeds"
        if jax.default_backend() == "cpu"
        else "",
        "attention_speedup_pallas_vs_xla": ratios,
        "rows": rows,
        "wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    main()
