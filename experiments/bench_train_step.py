"""Train-step speed and memory of VAR-d16, HMAR-d16 and LlamaGen-B / -L shaped generators, through jaxgen's real train
step, swept over the attention backend, the layer stack (`scan_layers`, `remat`), the dtype and the batch.

    # memory: per-device argument/temp bytes of the compiled step on 1 device vs fsdp=8 (8 host devices, CPU)
    python experiments/bench_train_step.py --mode=memory --out=experiments/results/train_step_memory_cpu.json
    # speed on the local device (GPU: bf16 and float32; MFU against --peak_tflops)
    python experiments/bench_train_step.py --mode=speed --dtype=bfloat16,float32 --out=...json
    # the MFU sweep: every combination of the comma lists is one row (a failed one, e.g. out of memory, an error row)
    python experiments/bench_train_step.py --mode=speed --models=var_d16 --attn_backend=xla,pallas \
        --scan_layers=true --remat=none,dots_no_batch --batch=64,128 --budget_s=92 --out=...json

Rows: the combinations of --models x --dtype x --remat x --scan_layers x --batch x --attn_backend, in that order
(the backend innermost, so the xla / pallas / cudnn twins of one setting run back to back, then the next batch: a
budget-cut sweep has every batch without remat before the remat rows). Every row carries its settings (model,
family, dtype, attn_backend, scan_layers, remat, batch) and "status": "ok" with the numbers, or "error" with the
one-line error (out of memory, cudnn off a GPU or in float32, ...); the sweep goes on after an error. The generator
settings go through the config's generator section (`cfg.var` / `cfg.hmar` / `cfg.gpt`), as
`--config.var.attn_backend=...` does for `jaxgen.main`. The JSON is rewritten after every row (`complete` false until
the sweep ends), so a run killed by a time limit keeps the rows that finished. `--budget_s`: no row starts once that
many seconds have passed since the script's imports, nor when the fastest finished row of the same model would not
fit in what is left; the combinations not run are listed in `skipped`.

Speed: steps/s (median of --repeats timed steps after 2 warm-up steps), tokens/s = batch * seq_len * steps/s, and
model FLOPs utilisation = (6 * trained params * tokens + attention FLOPs) per second / peak, where attention FLOPs
count the dense L x L QK^T and AV matmuls whatever the mask (the convention of the H100 table in
experiments/README.md, so rows of every backend divide the same work); the peak is the device's dense bf16 peak, also
for float32 rows. XLA's own count of the compiled step (`cost_analysis()['flops']`) is reported beside it, and
`lower_s` / `compile_s` (trace + StableHLO, XLA compile) and the compiled step's `memory_analysis()`. Trained params:
all of them, except HMAR's stage 1, which trains everything outside the mask branch (its first stage's task and
optimizer, as `jaxgen.train.loop` builds them). Memory: `compiled.memory_analysis()` of the same step lowered for a
1-device mesh and for fsdp=8 (params, optimizer state and EMA sharded by the 'embed' rule).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from pathlib import Path

if "--mode=memory" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from timing import emit, median_time, write_report

from jaxgen.config_util import load_config
from jaxgen.families import FAMILIES, build_models, example_image
from jaxgen.models.layer_stack import REMAT_POLICIES
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.parallel.rules import DEFAULT_RULES
from jaxgen.train.generator_task import generator_task
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step

REPO = Path(__file__).resolve().parents[1]
_T0 = time.monotonic()  # --budget_s counts from here (the imports before it take a few seconds)

MODELS = {  # name -> (config, family); the config paths are relative to the repo root
    "var_d16": ("configs/var_imagenet.py:d16", "var"),
    "hmar_d16": ("configs/hmar_imagenet.py:d16", "hmar"),  # stage 1 (next-scale branch, block-diagonal mask)
    "llamagen_B": ("configs/llamagen_imagenet.py:B", "llamagen"),
    "llamagen_L": ("configs/llamagen_imagenet.py:L", "llamagen"),
    # quick checks of the script itself (tests, gpu_suite.sh --quick)
    "var_tiny": ("configs/var_tiny.py", "var"),
    "hmar_tiny": ("configs/digits_hmar.py", "hmar"),
    "llamagen_tiny": ("configs/llamagen_tiny.py", "llamagen"),
}
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of jax's device_kind; the first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
ATTN_BACKENDS = ("xla", "cudnn", "pallas")
# the families whose objective reads the frozen tokenizer params (VAR's teacher-forcing input); LlamaGen's reads none
READS_TOKENIZER = ("var", "hmar")


def peak_tflops(kind: str) -> float:
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in kind.lower()), 0.0)


def _setup(name: str, dtype: str, batch: int, attn_backend=None, scan_layers=None, remat=None) -> dict:
    """The task, a boxed state initialiser, the pure step and abstract inputs for one model; the generator settings
    that are not None replace the config's."""
    spec, family = MODELS[name]
    path, _, variant = spec.partition(":")
    cfg = load_config(str(REPO / path) + (f":{variant}" if variant else ""))
    cfg.family = family
    fam = FAMILIES[family]
    section = cfg[fam.generator_key]
    for key, value in (("attn_backend", attn_backend), ("scan_layers", scan_layers), ("remat", remat)):
        if value is not None:
            section[key] = value
    _, tok, gen = build_models(cfg, generator_dtype=dtype)
    stage = fam.generator_stages()[0]
    task = generator_task(fam, tok, gen, stage=stage)
    seq = tok.token_layout(fam.image_size(tok, gen)).num_tokens
    frozen = None
    if family in READS_TOKENIZER:
        image = example_image(fam, tok, gen)
        frozen = partition.strip_boxes(jax.eval_shape(lambda: tok.init(jax.random.key(0), image)["params"]))
    tx = task.optimizer(ml_collections.ConfigDict(train_section(steps=1000, lr=1e-4)))

    def init_boxed(key_data):
        key = jax.random.wrap_key_data(key_data)
        params, model_state = task.init(key)
        return create_state(params, tx, key_data, model_state)

    return dict(
        task=task, gen=gen, family=family, init=init_boxed, seq=seq, vocab=gen.config.vocab_size, frozen=frozen,
        step=make_train_step(task.loss_fn, tx, ema_decay=0.999), batch=batch, trainable=stage.trainable,
        classes=gen.config.num_classes,
    )  # fmt: skip


def _flops_per_token(params: int, cfg, family: str, seq: int) -> float:
    """Training FLOPs per token: 6 x trained params, plus the attention matmuls (QK^T and AV: 4 * seq * width per
    token and layer forward, x3 with the backward), dense L x L whatever the mask."""
    layers = cfg.n_layer if family == "llamagen" else cfg.depth
    width = cfg.dim if family == "llamagen" else cfg.embed_dim
    return 6.0 * params + 12.0 * layers * seq * width


def _lower(setup: dict, mesh, rules):
    """The step lowered for `mesh`: state sharded by the rules, batch by the 'batch' rule, donated state."""
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract = partition.abstract_boxed(setup["init"], key_data)
    shardings = partition.tree_shardings(abstract, mesh, rules)
    state_in = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), partition.strip_boxes(abstract), shardings
    )
    b, seq = setup["batch"], setup["seq"]
    batch_in = {
        "tokens": jax.ShapeDtypeStruct((b, seq), jnp.int32, sharding=partition.batch_sharding(mesh, rules, 2)),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=partition.batch_sharding(mesh, rules, 1)),
    }
    with partition.activation_rules(mesh, rules):
        jitted = jax.jit(setup["step"], out_shardings=(shardings, None), donate_argnums=0)
        return jitted.lower(state_in, batch_in, setup["frozen"]), shardings


# ---- the sweep --------------------------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"--scan_layers: {text!r} is not true or false")


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def combinations(args) -> list[dict]:
    """Every row's settings, in sweep order (model, dtype, remat, scan_layers, batch, attn_backend; the last varies
    fastest)."""
    grid = itertools.product(
        _list(args.models),
        _list(args.dtype),
        _list(args.remat),
        [_bool(s) for s in _list(args.scan_layers)],
        [int(b) for b in _list(args.batch)],
        _list(args.attn_backend),
    )
    return [dict(model=m, family=MODELS[m][1], dtype=d, batch=b, attn_backend=a, scan_layers=s, remat=r)
            for m, d, r, s, b, a in grid]  # fmt: skip


def check_args(args, parser) -> None:
    """Unknown models / backends / remat policies fail before anything compiles (a typo is not an error row)."""
    unknown = [m for m in _list(args.models) if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; use {sorted(MODELS)}")
    bad = [a for a in _list(args.attn_backend) if a not in ATTN_BACKENDS]
    if bad:
        parser.error(f"--attn_backend: unknown {bad}; use {list(ATTN_BACKENDS)}")
    bad = [r for r in _list(args.remat) if r not in REMAT_POLICIES]
    if bad:
        parser.error(f"--remat: unknown {bad}; use {sorted(REMAT_POLICIES)}")
    try:
        [_bool(s) for s in _list(args.scan_layers)]
        [int(b) for b in _list(args.batch)]
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))


def _setup_of(combo: dict) -> dict:
    keys = ("attn_backend", "scan_layers", "remat")
    return _setup(combo["model"], combo["dtype"], combo["batch"], **{k: combo[k] for k in keys})


def _memory_fields(mem) -> dict:
    return {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }


def memory_rows(combo: dict) -> list[dict]:
    """The step's per-device memory on a 1-device mesh and on fsdp=8 (two rows)."""
    setup = _setup_of(combo)
    rows = []
    for fsdp in (1, 8):
        devices = jax.devices()[:fsdp]
        mesh = mesh_lib.create_mesh({"data": 1, "fsdp": fsdp, "tensor": 1}, devices=devices)
        lowered, _ = _lower(setup, mesh, DEFAULT_RULES)
        mem = _memory_fields(lowered.compile().memory_analysis())
        rows.append({**combo, "status": "ok", "devices": fsdp, "mesh": f"data=1 fsdp={fsdp} tensor=1",
                     **{f"{k}_per_device": v for k, v in mem.items()}})  # fmt: skip
    rows[0]["argument_bytes_1_over_8"] = round(rows[0]["argument_bytes_per_device"] /
                                               rows[1]["argument_bytes_per_device"], 2)  # fmt: skip
    return rows


def speed_row(combo: dict, mesh, repeats: int, peak: float) -> dict:
    """One combination's step time, throughput and MFU on `mesh` (real arrays, random tokens)."""
    setup = _setup_of(combo)
    t0 = time.perf_counter()
    lowered, _ = _lower(setup, mesh, DEFAULT_RULES)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    mem = _memory_fields(compiled.memory_analysis())
    state = partition.init_sharded(setup["init"], mesh, DEFAULT_RULES, jax.random.key_data(jax.random.key(0)))
    rng = np.random.default_rng(0)
    b, seq = setup["batch"], setup["seq"]
    batch = partition.shard_batch(
        {"tokens": rng.integers(0, setup["vocab"], (b, seq)).astype(np.int32),
         "label": rng.integers(0, setup["classes"], (b,)).astype(np.int32)}, mesh, DEFAULT_RULES)  # fmt: skip
    frozen = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup["frozen"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    trained = sum(int(np.prod(x.shape)) for k, v in state.params.items() if setup["trainable"](k)
                  for x in jax.tree.leaves(v))  # fmt: skip
    holder = [state]
    del state

    def run(_):
        holder[0], metrics = compiled(holder[0], batch, frozen)
        return jax.block_until_ready(metrics["loss"])

    run(-1)
    step_s, _ = median_time(run, repeats)  # its own warm-up run first: 2 untimed steps in all
    holder.clear()
    model_flops = _flops_per_token(trained, setup["gen"].config, setup["family"], seq) * b * seq
    return {
        **combo, "status": "ok", "seq_len": seq, "params": n_params, "trained_params": trained,
        "pallas_interpret": combo["attn_backend"] == "pallas" and jax.default_backend() == "cpu",
        "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
        "step_s": round(step_s, 5), "steps_per_s": round(1 / step_s, 3), "tokens_per_s": round(b * seq / step_s, 1),
        "model_tflops_per_step": round(model_flops / 1e12, 3),
        "xla_tflops_per_step": round(float(cost.get("flops", 0.0)) / 1e12, 3),
        "achieved_tflops": round(model_flops / step_s / 1e12, 2),
        "peak_bf16_tflops": peak,
        "mfu": round(model_flops / step_s / 1e12 / peak, 4) if peak else None,
        "memory": mem,
    }  # fmt: skip


def _one_line(e: BaseException) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:500]


def sweep(args, report) -> list[dict]:
    """Run every combination (rows appended to `report.rows`, the JSON rewritten after each); honours --budget_s."""
    combos = combinations(args)
    if args.mode == "speed":
        mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
    fastest: dict[str, float] = {}  # model -> its fastest finished row's wall seconds
    for i, combo in enumerate(combos):
        elapsed = time.monotonic() - _T0
        if args.budget_s and elapsed + fastest.get(combo["model"], 0.0) > args.budget_s:
            report.skipped = combos[i:]
            print(f"budget: {elapsed:.0f} s of {args.budget_s:.0f} s spent, {len(combos) - i} rows not started",
                  flush=True)  # fmt: skip
            break
        t0 = time.monotonic()
        try:
            rows = memory_rows(combo) if args.mode == "memory" else [speed_row(combo, mesh, args.repeats, peak)]
        except Exception as e:  # out of memory, a backend the device lacks, ...: an error row, the sweep goes on
            rows = [{**combo, "status": "error", "error": _one_line(e)}]
        row_s = time.monotonic() - t0
        for row in rows:
            row["row_s"] = round(row_s, 2)
            emit(report.rows, row)
        if rows[0]["status"] == "ok":
            fastest[combo["model"]] = min(row_s, fastest.get(combo["model"], float("inf")))
        gc.collect()  # the previous row's device buffers go before the next compiles
        report.write()
    return report.rows


class Report:
    """The JSON of the run, rewritten by `write()` (after every row)."""

    def __init__(self, args):
        self.args, self.rows, self.skipped, self.complete = args, [], [], False
        self.out = args.out or REPO / f"experiments/results/train_step_{args.mode}_{jax.default_backend()}.json"

    def write(self) -> None:
        a = self.args
        write_report(
            f"train_step_{a.mode}", self.out, self.rows, args=vars(a), complete=self.complete,
            budget_s=a.budget_s, elapsed_s=round(time.monotonic() - _T0, 1), skipped=self.skipped,
            errors=sum(r.get("status") == "error" for r in self.rows),
            mfu_convention="(6 x trained params x tokens + 12 x layers x seq x width x tokens) / step time / dense "
                           "bf16 peak (attention counted dense L x L whatever the mask; the bf16 peak for float32 too)",
        )  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("memory", "speed"), required=True)
    p.add_argument("--models", default="var_d16,llamagen_B", help=f"comma list of {sorted(MODELS)}")
    p.add_argument(
        "--dtype",
        default=None,
        help="comma list of compute dtypes, params stay float32 (default: speed bfloat16, memory float32)",
    )
    p.add_argument("--batch", default="16", help="comma list of global batch sizes")
    p.add_argument("--attn_backend", default="xla", help=f"comma list of {list(ATTN_BACKENDS)}")
    p.add_argument("--scan_layers", default="false", help="comma list of true / false")
    p.add_argument("--remat", default="none", help=f"comma list of {sorted(REMAT_POLICIES)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak of the device (default: by name)")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="start no row after this many seconds since the imports (0: no limit)")  # fmt: skip
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.mode == "memory" else "bfloat16")
    check_args(args, p)
    report = Report(args)
    report.write()  # a run killed in its first row still leaves its settings
    sweep(args, report)
    report.complete = True
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
