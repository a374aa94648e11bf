"""The Axial Transformer's speed, pallas vs xla: the axial attention op, the training step and the sampler.

    python experiments/bench_axial.py --preset=cpu --out=experiments/results/axial_bench_cpu.json   # 2 cores, minutes
    python experiments/bench_axial.py --preset=gpu --out=$OUT/axial_gpu.json       # ~60 s step of gpu_suite.sh
    python experiments/bench_axial.py --preset=gpu_full --out=$OUT/axial_gpu_full.json   # every row (est. ~6 min)
    python experiments/bench_axial.py --preset=quick --out=/tmp/axial_quick.json   # smoke, seconds on a CPU

Parts (`--parts`), run in this order, the JSON rewritten after every row (a time limit keeps what finished):

- `attention`: `jaxgen.models.attention.axial_attention` forward + backward (`jax.vjp`, then the pullback of a
  random cotangent: dq, dk, dv) for row and column attention, causal and not, at the model shapes `[B, S, S, heads,
  head_dim]` (ImageNet64: [B, 64, 64, 16, 128]; ImageNet32: [B, 32, 32, 16, 96], which the pallas backend pads to
  128), per backend: `pallas` (`pallas_kernels/axial_attention`, flash forward and backward), `xla` (the other axis
  folded into the batch, the dense masked softmax), `cudnn` (GPU, bf16; the same fold). The issue's target is pallas
  >= 1.5x xla at 64x64 on a GPU: `ratios.attention_target` is the xla / pallas time of the four cases weighted by
  how often an 8/8/8 model runs each one (per step: 8 unmasked row, 8 causal row, 4 unmasked column, 4 causal column
  blocks), beside every case's own ratio.
- `train`: one value-and-gradient of the real training loss (`jaxgen.families.axial.objective`: bits per dim of one
  random channel per image, the conditioning stack included) of `AxialTransformer`, per backend; no optimizer.
- `sample`: the cached sampler (`jaxgen.sampling.axial.AxialSampler`), pixels (and subpixels) per second, per
  backend (the backend only changes the unmasked row blocks the outer decoder runs once per finished row; the cached
  per-pixel steps are the same dense decode in both).

Correctness is checked before anything is timed, so no time is recorded for a wrong kernel: attention rows compare
out / dq / dk / dv with a float32 XLA reference (highest matmul precision) computed from the same rounded inputs,
err = max |got - ref| / max |ref| per tensor, and a row passes when its worst err is within `TOLERANCE` (or twice xla's
own err in that dtype, when larger); train rows compare the loss and the gradients with xla's (relative L2 norm of
the difference over all parameters); sample rows record the fraction of subpixels equal to xla's from the same key
(informational: one flipped near-tie changes everything after it). A row that fails its check keeps its errors and
`ok: false` and has no time; `failed_checks` lists them.

Times: compile (`lower().compile()`) apart from the median of `--repeats` steady-state runs after a warm-up
(`timing.median_time`). Throughput counts the attention as 4 * lines * L^2 * head_dim flops forward (two matmuls)
and 3.5x that forward + backward, halved when causal (bench_attention.py's convention); `peak_fraction` divides by
the device's dense bf16 peak. On a CPU the Pallas kernels run in interpret mode (XLA CPU ops emulating the kernel's
tiles, not a kernel), so the cpu preset runs pallas only at tiny sizes, as a correctness check: those times say
nothing about the kernel. The official code is TF1 and cannot run here (no TensorFlow): no side-by-side row.

`--budget-s` (the gpu preset: 45 s from the start of main, for a 60 s suite step) stops starting new rows when less
than a part's `min_left_s` remains; what was not run is listed in `skipped`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import peak_tflops
from timing import compile_timed, emit, median_time, write_report

from jaxgen.families.axial import objective
from jaxgen.models.attention import axial_attention
from jaxgen.models.generators.axial import AxialConfig, AxialTransformer
from jaxgen.models.tokenizers.pixels import PixelConfig, PixelTokenizer
from jaxgen.sampling.axial import AxialSampler
from jaxgen.train.step import LossContext

# ImageNet 32 / 64 as released (configs/axial_imagenet.py): width, heads, dropout; 8/8/8 layers
RELEASED = {
    32: dict(hidden_size=1536, num_heads=16, dropout=0.04),
    64: dict(hidden_size=2048, num_heads=16, dropout=0.0),
}
ATTENTION_CASES = (("row", False), ("row", True), ("col", False), ("col", True))
# per train / eval step of a model with 8/8/8 layers: outer 4 (row, causal col) pairs, inner 8 causal rows, the
# conditioning stack 4 (row, col) pairs, all unmasked
MODEL_WEIGHTS = {("row", False): 8, ("row", True): 8, ("col", False): 4, ("col", True): 4}
TARGET = {"attention_pallas_over_xla_64px": 1.5}  # GPU, bf16, the model-weighted ratio at 64x64
# attention: worst err vs the float32 reference; train: relative L2 of the gradient difference vs xla
TOLERANCE = {"cpu": {"float32": 1e-5, "bfloat16": 2e-2}, "gpu": {"float32": 5e-3, "bfloat16": 2e-2}}
TRAIN_TOLERANCE = {"cpu": {"float32": 1e-4, "bfloat16": 5e-2}, "gpu": {"float32": 5e-3, "bfloat16": 5e-2}}


@dataclasses.dataclass(frozen=True)
class Preset:
    dtype: str
    width: tuple[int, int] | None  # (D, heads); None: the released width of each size
    layers: int  # outer = inner = exterior layers
    attn_sizes: tuple[int, ...]
    attn_batch: int
    attn_backends: tuple[str, ...]
    train_sizes: tuple[int, ...]
    train_batch: int
    samples: tuple[tuple[int, int], ...]  # (size, batch)
    pallas_max: dict  # part -> the largest size pallas runs at (a CPU runs it in interpret mode)
    repeats: dict  # part -> timed runs
    budget_s: float = 0.0  # 0: no limit
    min_left_s: dict = dataclasses.field(default_factory=dict)  # part -> seconds a row needs to be started
    released_dropout: bool = False


ALL = {"attention": 1 << 30, "train": 1 << 30, "sample": 1 << 30}
PRESETS = {
    # one ~60 s step of gpu_suite.sh: the attention op first (the target), then what the budget leaves
    "gpu": Preset(dtype="bfloat16", width=None, layers=8, attn_sizes=(64, 32), attn_batch=8,
                  attn_backends=("xla", "pallas", "cudnn"), train_sizes=(64, 32), train_batch=4,
                  samples=((32, 4), (64, 1)), pallas_max=ALL, repeats={"attention": 20, "train": 5, "sample": 2},
                  budget_s=45.0, min_left_s={"attention": 3.0, "train": 30.0, "sample": 30.0},
                  released_dropout=True),
    # every row at the released sizes: its own device call
    "gpu_full": Preset(dtype="bfloat16", width=None, layers=8, attn_sizes=(64, 32), attn_batch=8,
                       attn_backends=("xla", "pallas", "cudnn"), train_sizes=(64, 32), train_batch=4,
                       samples=((32, 4), (64, 1)), pallas_max=ALL,
                       repeats={"attention": 20, "train": 5, "sample": 2}, budget_s=540.0,
                       min_left_s={"attention": 3.0, "train": 45.0, "sample": 60.0}, released_dropout=True),
    # two CPU cores: D 96 / 4 heads (head dim 24: pallas pads it to 32, as 96 -> 128 at ImageNet32), 2/2/2 layers;
    # pallas (interpret mode) only at the tiny sizes
    "cpu": Preset(dtype="float32", width=(96, 4), layers=2, attn_sizes=(16, 32, 64), attn_batch=1,
                  attn_backends=("xla", "pallas"), train_sizes=(8, 32, 64), train_batch=2,
                  samples=((8, 2), (16, 2)), pallas_max={"attention": 16, "train": 8, "sample": 8},
                  repeats={"attention": 5, "train": 3, "sample": 2}),
    "quick": Preset(dtype="float32", width=(32, 2), layers=2, attn_sizes=(8,), attn_batch=1,
                    attn_backends=("xla", "pallas"), train_sizes=(8,), train_batch=2, samples=((4, 1),),
                    pallas_max=ALL, repeats={"attention": 2, "train": 2, "sample": 1}),
}  # fmt: skip


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _platform() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "gpu"


def model_config(p: Preset, size: int, backend: str) -> AxialConfig:
    rel = RELEASED.get(size, RELEASED[64])
    d, heads = p.width or (rel["hidden_size"], rel["num_heads"])
    n = p.layers
    return AxialConfig(height=size, width=size, channels=3, hidden_size=d, num_heads=heads, num_outer_layers=n,
                       num_inner_layers=n, num_exterior_layers=n, dtype=p.dtype, attn_backend=backend,
                       dropout=rel["dropout"] if p.released_dropout else 0.0,
                       # not the near-zero release init: every block's branches and the logits must carry signal
                       # for the gradient check to see the attention
                       res_init_scale=1.0, logits_init_scale=1.0)  # fmt: skip


def rel_errs(got, want) -> list[float]:
    """max |got - want| / max |want| of each pair of arrays."""
    out = []
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        out.append(float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30)))
    return out


def backend_skip(backend: str, part: str, size: int, p: Preset) -> str | None:
    """Why `backend` does not run at this size, or None."""
    if backend == "pallas" and size > p.pallas_max[part]:
        return f"pallas runs in interpret mode on a CPU: only at sizes <= {p.pallas_max[part]} ({part})"
    if backend == "cudnn" and (jax.default_backend() != "gpu" or p.dtype == "float32"):
        return "cudnn needs an NVIDIA GPU and bf16 / fp16"
    return None


# ---- attention --------------------------------------------------------------------------------------------------
def attention_fwd_bwd(axis: str, causal: bool, scale: float, backend: str):
    def f(q, k, v, g):
        op = lambda q, k, v: axial_attention(q, k, v, axis=axis, causal=causal, scale=scale, backend=backend)
        out, pull = jax.vjp(op, q, k, v)
        return (out, *pull(g))

    return jax.jit(f)


def attention_case(p: Preset, size: int, axis: str, causal: bool, add: Callable, skip: Callable) -> None:
    """One (size, axis, causal) case: the float32 reference, then one row per backend (checked, then timed)."""
    cfg = model_config(p, size, "xla")
    heads, hd = cfg.num_heads, cfg.head_dim
    shape = (p.attn_batch, size, size, heads, hd)
    dtype = jnp.dtype(p.dtype)
    keys = jax.random.split(jax.random.key(size * 10 + 2 * (axis == "col") + causal), 4)
    inputs = [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]
    scale = hd**-0.5
    with jax.default_matmul_precision("highest"):
        ref_fn = attention_fwd_bwd(axis, causal, scale, "xla").lower(*(x.astype(jnp.float32) for x in inputs))
    ref = jax.block_until_ready(ref_fn.compile()(*(x.astype(jnp.float32) for x in inputs)))
    lines = p.attn_batch * size * heads
    flops = 3.5 * 4 * lines * size * size * hd * (0.5 if causal else 1.0)
    peak = peak_tflops(jax.devices()[0].device_kind) if p.dtype == "bfloat16" else None
    tol = TOLERANCE[_platform()][p.dtype]
    xla_err = None
    for backend in p.attn_backends:
        row = dict(part="attention", size=size, axis=axis, causal=causal, backend=backend, dtype=p.dtype,
                   shape=list(shape), pallas_interpret=backend == "pallas" and _platform() == "cpu")  # fmt: skip
        if why := backend_skip(backend, "attention", size, p):
            skip(row, why)
            continue
        compiled, compile_s = compile_timed(attention_fwd_bwd(axis, causal, scale, backend).lower(*inputs))
        got = jax.block_until_ready(compiled(*inputs))
        errs = rel_errs(got, ref)
        worst = max(errs)
        # xla is held to the tolerance; another backend to the tolerance or twice xla's own err, when larger
        limit = tol if backend == "xla" or xla_err is None else max(tol, 2 * xla_err)
        if backend == "xla":
            xla_err = worst
        row.update(compile_s=round(compile_s, 3), err_vs_f32={n: _sig(e, 3) for n, e in
                   zip(("out", "dq", "dk", "dv"), errs, strict=True)}, err_limit=_sig(limit, 3),
                   ok=bool(worst <= limit))  # fmt: skip
        if row["ok"]:
            run = lambda _, f=compiled: jax.block_until_ready(f(*inputs))
            run_s, _ = median_time(run, p.repeats["attention"])
            tflops = flops / run_s / 1e12
            row.update(fwd_bwd_ms=_sig(run_s * 1e3), tflops=_sig(tflops, 3))
            if peak:
                row["peak_fraction"] = _sig(tflops / peak, 3)
        add(row)


# ---- train ------------------------------------------------------------------------------------------------------
def loss_and_grad(model: AxialTransformer):
    """(params, batch, ctx) -> (loss, grads) of the family's training loss, jitted."""
    loss_fn = objective(None, model)
    return jax.jit(jax.value_and_grad(lambda params, batch, ctx: loss_fn(params, batch, ctx)[0]))


def train_case(p: Preset, size: int, add: Callable, skip: Callable) -> None:
    """xla, then pallas: value and gradient of the training loss, checked against xla's, then timed."""
    b = p.train_batch
    rng = np.random.default_rng(size)
    batch = {"tokens": jnp.asarray(rng.integers(0, 256, (b, size * size * 3)), jnp.int32),
             "label": jnp.zeros((b,), jnp.int32)}  # fmt: skip
    ctx = LossContext(rng=jax.random.key(1), step=jnp.int32(0), frozen=None, model_state={})
    params, ref = None, None
    for backend in ("xla", "pallas"):
        model = AxialTransformer(model_config(p, size, backend))
        row = dict(part="train", size=size, backend=backend, dtype=p.dtype, batch=b,
                   pallas_interpret=backend == "pallas" and _platform() == "cpu")  # fmt: skip
        if why := backend_skip(backend, "train", size, p):
            skip(row, why)
            continue
        if params is None:
            params = jax.jit(model.init)(jax.random.key(0), *model.example_inputs())["params"]
        compiled, compile_s = compile_timed(loss_and_grad(model).lower(params, batch, ctx))
        loss, grads = jax.block_until_ready(compiled(params, batch, ctx))
        c = model.config
        row.update(hidden_size=c.hidden_size, num_heads=c.num_heads, head_dim=c.head_dim, layers=p.layers,
                   dropout=c.dropout, params=sum(int(x.size) for x in jax.tree.leaves(params)),
                   compile_s=round(compile_s, 3), loss_bits_per_dim=_sig(float(loss), 6))  # fmt: skip
        mem = compiled.memory_analysis()
        if mem is not None:
            row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["ok"] = True
        if backend == "xla":
            ref = (loss, grads)
        elif ref is not None:
            flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref[1])
            diff2 = sum(float(jnp.sum((a.astype(jnp.float32) - b_.astype(jnp.float32)) ** 2))
                        for a, b_ in zip(flat, ref_flat, strict=True))  # fmt: skip
            norm2 = sum(float(jnp.sum(b_.astype(jnp.float32) ** 2)) for b_ in ref_flat)
            grad_rel = math.sqrt(diff2 / max(norm2, 1e-30))
            loss_rel = abs(float(loss) - float(ref[0])) / abs(float(ref[0]))
            limit = TRAIN_TOLERANCE[_platform()][p.dtype]
            row.update(loss_rel_diff_vs_xla=_sig(loss_rel, 3), grad_rel_l2_vs_xla=_sig(grad_rel, 3),
                       grad_limit=limit, ok=bool(grad_rel <= limit and loss_rel <= limit))  # fmt: skip
        if row["ok"]:
            run = lambda _, f=compiled, w=params: jax.block_until_ready(f(w, batch, ctx))
            run_s, _ = median_time(run, p.repeats["train"])
            row.update(step_ms=_sig(run_s * 1e3), images_per_s=_sig(b / run_s),
                       trained_subpixels_per_s=_sig(b * size * size / run_s))  # fmt: skip
        add(row)
        del compiled, grads


# ---- sample -----------------------------------------------------------------------------------------------------
def sample_case(p: Preset, size: int, b: int, add: Callable, skip: Callable) -> None:
    labels = np.zeros(b, np.int32)
    labels_j = jnp.asarray(labels)
    key = jax.random.key(0)
    params, ref = None, None
    for backend in ("xla", "pallas"):
        model = AxialTransformer(model_config(p, size, backend))
        row = dict(part="sample", size=size, backend=backend, dtype=p.dtype, batch=b,
                   pallas_interpret=backend == "pallas" and _platform() == "cpu")  # fmt: skip
        if why := backend_skip(backend, "sample", size, p):
            skip(row, why)
            continue
        if params is None:
            params = jax.jit(model.init)(jax.random.key(0), *model.example_inputs())["params"]
        sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=3)))
        compiled, compile_s = compile_timed(sampler.lower(params, {}, labels, key))
        pixels = np.asarray(compiled(params, {}, labels_j, key).pixels)
        row.update(hidden_size=model.config.hidden_size, num_heads=model.config.num_heads, layers=p.layers,
                   compile_s=round(compile_s, 3))  # fmt: skip
        if backend == "xla":
            ref = pixels
        elif ref is not None:
            row["subpixels_equal_to_xla"] = _sig(float(np.mean(pixels == ref)), 4)
        run = lambda i, f=compiled, w=params: jax.block_until_ready(f(w, {}, labels_j, jax.random.key(i)).pixels)
        run_s, _ = median_time(run, p.repeats["sample"])
        row.update(run_s=_sig(run_s), pixels_per_s=_sig(b * size * size / run_s),
                   subpixels_per_s=_sig(b * size * size * 3 / run_s))  # fmt: skip
        add(row)


# ---- report -----------------------------------------------------------------------------------------------------
def ratios(results: list[dict], on_gpu: bool) -> dict:
    """xla (or cudnn) time / pallas time per attention case and model-weighted per size, the target, the train
    step's and the sampler's pallas / xla speed."""
    att = {(r["size"], r["axis"], r["causal"], r["backend"]): r["fwd_bwd_ms"] for r in results
           if r["part"] == "attention" and "fwd_bwd_ms" in r}  # fmt: skip
    out: dict = {"attention_pallas_over_xla": {}, "attention_pallas_over_cudnn": {}, "attention_model_weighted": {}}
    sizes = sorted({k[0] for k in att})
    for size in sizes:
        for other, name in (("xla", "attention_pallas_over_xla"), ("cudnn", "attention_pallas_over_cudnn")):
            pairs = {c: (att.get((size, *c, other)), att.get((size, *c, "pallas"))) for c in ATTENTION_CASES}
            for (axis, causal), (t_o, t_p) in pairs.items():
                if t_o and t_p:
                    out[name][f"{axis}_{'causal' if causal else 'full'}_{size}px"] = _sig(t_o / t_p, 3)
            if all(t_o and t_p for t_o, t_p in pairs.values()):
                num = sum(MODEL_WEIGHTS[c] * pairs[c][0] for c in ATTENTION_CASES)
                den = sum(MODEL_WEIGHTS[c] * pairs[c][1] for c in ATTENTION_CASES)
                out["attention_model_weighted"][f"pallas_over_{other}_{size}px"] = _sig(num / den, 3)
    headline = out["attention_model_weighted"].get("pallas_over_xla_64px")
    cases_64 = [v for k, v in out["attention_pallas_over_xla"].items() if k.endswith("_64px")]
    out["attention_target"] = {
        "pallas_over_xla_64px_model_weighted": headline,
        "pallas_over_xla_64px_worst_case": min(cases_64) if len(cases_64) == 4 else None,
        "target": TARGET["attention_pallas_over_xla_64px"],
        "met": (headline >= TARGET["attention_pallas_over_xla_64px"]) if on_gpu and headline else None,
        "note": None if on_gpu else "not evaluated: pallas on a CPU is interpret mode",
    }
    for part, key, inverse in (("train", "step_ms", True), ("sample", "pixels_per_s", False)):
        rows = {(r["size"], r["backend"]): r[key] for r in results if r["part"] == part and key in r}
        out[f"{part}_pallas_over_xla"] = {
            f"{size}px": _sig((rows[(size, "xla")] / v) if inverse else (v / rows[(size, "xla")]), 3)
            for (size, backend), v in rows.items() if backend == "pallas" and (size, "xla") in rows
        }  # fmt: skip
    return out


def apply_overrides(p: Preset, args) -> Preset:
    changes = {}
    if args.width:
        d, heads = (int(x) for x in args.width.split(","))
        changes["width"] = (d, heads)
    if args.layers:
        changes["layers"] = args.layers
    if args.dtype:
        changes["dtype"] = args.dtype
    for name in ("attn_sizes", "train_sizes"):
        value = getattr(args, name)
        if value:
            changes[name] = tuple(int(x) for x in value.split(","))
    if args.samples:
        changes["samples"] = tuple(tuple(int(v) for v in s.split("x")) for s in args.samples.split(","))
    if args.backends:
        changes["attn_backends"] = tuple(args.backends.split(","))
    for name in ("attn_batch", "train_batch"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    if args.repeats:
        changes["repeats"] = dict.fromkeys(p.repeats, args.repeats)
    if args.budget_s is not None:
        changes["budget_s"] = args.budget_s
    return dataclasses.replace(p, **changes)


def main() -> int:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--parts", default="attention,train,sample")
    ap.add_argument("--width", default="", help="D,heads (default: the preset's; the gpu presets: the released)")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"])
    ap.add_argument("--attn-sizes", dest="attn_sizes", default="")
    ap.add_argument("--train-sizes", dest="train_sizes", default="")
    ap.add_argument("--samples", default="", help="comma list of SIZExBATCH, e.g. 32x4,64x1")
    ap.add_argument("--backends", default="", help="attention rows' backends (xla,pallas,cudnn)")
    ap.add_argument("--attn-batch", dest="attn_batch", type=int, default=0)
    ap.add_argument("--train-batch", dest="train_batch", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=0, help="timed runs of every part (0: the preset's)")
    ap.add_argument("--budget-s", dest="budget_s", type=float, default=None, help="0: no limit")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    p = apply_overrides(PRESETS[args.preset], args)
    parts = args.parts.split(",")
    out = args.out or f"experiments/results/axial_bench_{jax.default_backend()}.json"
    on_gpu = jax.default_backend() == "gpu"
    results: list[dict] = []
    errors: list[dict] = []
    skipped: list[dict] = []
    ident = ("part", "size", "axis", "causal", "backend", "batch")

    def report():
        interp = "on a CPU the Pallas kernels run in interpret mode (an emulation with XLA CPU ops): pallas rows "
        interp += "there are correctness checks at tiny sizes, their times say nothing about the kernel; "
        write_report(
            "axial_bench", out, results, preset_name=args.preset, preset=dataclasses.asdict(p), parts=parts,
            note=(interp if not on_gpu else "") + "the official code is TF1 and cannot run here (no TensorFlow); "
            + args.note,
            models={s: dataclasses.asdict(model_config(p, s, "xla")) for s in
                    sorted({*p.attn_sizes, *p.train_sizes, *(s for s, _ in p.samples)})},
            tolerance={"attention_err_vs_f32": TOLERANCE[_platform()][p.dtype],
                       "train_grad_rel_l2_vs_xla": TRAIN_TOLERANCE[_platform()][p.dtype]},
            ratios=ratios(results, on_gpu), targets=TARGET,
            failed_checks=[{k: r[k] for k in ident if k in r} for r in results if r.get("ok") is False],
            skipped=skipped, errors=errors, wall_s=round(time.perf_counter() - t0, 1),
        )  # fmt: skip

    def add(row):
        emit(results, row)
        report()

    def skip(row, why):
        skipped.append({**{k: row[k] for k in ident if k in row}, "reason": why})

    units: list[tuple[str, dict, Callable[[], None]]] = []
    if "attention" in parts:
        for size in p.attn_sizes:
            for axis, causal in ATTENTION_CASES:
                units.append(("attention", dict(size=size, axis=axis, causal=causal),
                              lambda s=size, a=axis, c=causal: attention_case(p, s, a, c, add, skip)))  # fmt: skip
    if "train" in parts:
        for size in p.train_sizes:
            units.append(("train", dict(size=size), lambda s=size: train_case(p, s, add, skip)))
    if "sample" in parts:
        for size, b in p.samples:
            units.append(("sample", dict(size=size, batch=b), lambda s=size, b=b: sample_case(p, s, b, add, skip)))
    for part, what, run in units:
        left = p.budget_s - (time.perf_counter() - t0)
        if p.budget_s and left < p.min_left_s.get(part, 0.0):
            skipped.append({"part": part, **what, "reason": f"budget: {left:.0f} s of {p.budget_s:.0f} s left"})
            continue
        try:
            run()
        except Exception as e:  # recorded; the other rows still run
            traceback.print_exc()
            errors.append({"part": part, **what, "error": f"{type(e).__name__}: {e}"[:2000]})
        report()
    report()
    r = ratios(results, on_gpu)
    print({"attention_target": r["attention_target"], "failed_checks": sum(x.get("ok") is False for x in results),
           "errors": len(errors), "skipped": len(skipped), "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
