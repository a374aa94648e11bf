"""XLA:CPU flag settings side by side: the main job's train steps and the CPU sampling benchmarks, each workload
under each setting in its own subprocess, interleaved (round r runs every setting of a workload before the next
workload, the settings' order rotated each round), so that a shared machine's load hits every setting alike.

    python experiments/bench_cpu_flags.py --rounds=2 --out=experiments/results/cpu_flags_cpu.json \
        [--settings=default,no_ynn] [--workloads=tok_train,gen_train,var_sample,llamagen_sample] \
        [--official_var=/path/to/VAR] [--official_llamagen=/path/to/LlamaGen]

Workloads (jaxgen's own code, float32, CPU):
- `tok_train`: one optimizer step of the tokenizer stage of `configs/digits_var.py` (VAR's multi-scale VQVAE on
  16 px digits at the config's batch, 64), built as `jaxgen.train.loop.train_stage` builds it (`plan_stage`: the
  real loss, AdamW, EMA, donated state); random images (speed does not depend on them). Median of --steps steps
  after 3 warm-up steps; `compile_s` apart.
- `gen_train`: the same for the generator stage (the next-scale transformer on `[64, 30]` token ids).
- `var_sample`: `bench_var_sampling.py --config=configs/var_small.py --batch=1,32` (images/s, the VQVAE decoder
  alone as `decode_s`).
- `llamagen_sample`: `bench_llamagen_sampling.py --config=configs/llamagen_small.py --batch=1`.
The sampling workloads run the existing scripts as subprocesses (XLA_FLAGS set) and read their JSON. With
--official_var / --official_llamagen, the `default` setting's run of round 1 also times the official PyTorch code
(XLA flags do not touch it), in the same process as that script runs it.

Each setting is a string of XLA flags that replaces XLA_FLAGS in the child: each row runs exactly the flags it
names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# Name -> XLA_FLAGS of the child. `no_ynn`: XLA:CPU's YNNPACK fusions off (the default list fuses dots, reductions
# and elementwise ops into YNNPACK calls); `no_ynn_reduce`: only the reductions taken out of YNNPACK (`-reduce`
# removes one type from XLA's default list); the rest add one more change to `no_ynn`.
SETTINGS = {
    "default": "",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "no_ynn_reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_ynn_onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
    "no_ynn_onednn_cc": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_custom_call=true",
    "no_ynn_no_xnn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false",
    "no_ynn_fast_min_max_off": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_min_max=false",
}
WORKLOADS = ("tok_train", "gen_train", "var_sample", "llamagen_sample")


# ---- worker: one train step of the main job's stages -------------------------------------------------------------


def _worker(kind: str, steps: int) -> dict:
    import jax
    import numpy as np

    from jaxgen.config_util import load_config
    from jaxgen.families import example_image, family_models, model_sections
    from jaxgen.models.registry import init_params
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import partition
    from jaxgen.parallel.rules import rules_from_config
    from jaxgen.train.generator_task import generator_task
    from jaxgen.train.loop import plan_stage
    from jaxgen.train.tokenizer_task import TokenizerLossConfig, load_lpips_frozen, tokenizer_task

    config = load_config(str(ROOT / "configs/digits_var.py"))
    family, sections = model_sections(config)
    mesh = mesh_lib.create_mesh(dict(config.parallel.mesh))
    rules = rules_from_config(config.parallel.rules)
    rng = np.random.default_rng(0)
    _, generator = family_models(family, sections)
    if kind == "tok_train":
        tc = config.train_tokenizer
        tokenizer, _ = family_models(family, sections, tokenizer_dtype=tc.compute_dtype, training=True)
        loss_cfg = TokenizerLossConfig.from_section(config.get("tokenizer_loss"))
        size = int(config.data.image_size)
        task = tokenizer_task(tokenizer, loss_cfg, image_size=size, frozen=load_lpips_frozen(loss_cfg))
        b = int(tc.batch_size)
        batch = {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)}
    elif kind == "gen_train":
        tc = config.train_generator
        plain_tok, generator = family_models(family, sections, generator_dtype=tc.compute_dtype)
        tok_params = init_params(plain_tok, jax.random.key(0), example_image(family, plain_tok, generator))
        task = generator_task(family, plain_tok, generator, tok_params)
        b = int(tc.batch_size)
        seq = plain_tok.token_layout(family.image_size(plain_tok, generator)).num_tokens
        batch = {"tokens": rng.integers(0, plain_tok.vocab_size, (b, seq)).astype(np.int32)}
    else:
        raise ValueError(kind)
    batch["label"] = rng.integers(0, 10, (b,)).astype(np.int32)
    plan = plan_stage(task, tc, mesh=mesh, rules=rules, seed=0)
    state = partition.init_sharded(plan.init_state, mesh, rules, plan.key_data)
    frozen = jax.device_put(task.frozen, plan.frozen_shardings) if task.frozen is not None else None
    batch = partition.shard_batch({k: batch[k] for k in plan.batch_shardings}, mesh, rules)
    with partition.activation_rules(mesh, rules):
        t0 = time.perf_counter()
        compiled = plan.jit_step().lower(state, batch, frozen).compile()
        compile_s = time.perf_counter() - t0
    times, loss = [], None
    for i in range(3 + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "batch": b,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5),
        "steps_per_s": round(1 / step_s, 3),
        "step_times": [round(t, 4) for t in times],
        "final_loss": loss,
    }


# ---- driver ------------------------------------------------------------------------------------------------------


def _device() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    except (OSError, StopIteration):
        isa = []
    return {"cpu_model": model, "cores": os.cpu_count(), "isa": isa, "platform": platform.platform()}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _child_env(flags: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = flags
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(cmd: list[str], flags: str, timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_child_env(flags), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def run_workload(workload: str, setting: str, args, official: bool) -> list[dict]:
    flags = SETTINGS[setting]
    base = {"workload": workload, "setting": setting, "xla_flags": flags, "load_1m_before": _load()}
    if workload in ("tok_train", "gen_train"):
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={workload}", f"--steps={args.steps}"]
        rc, out, wall = _run(cmd, flags, args.timeout)
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
        if rc != 0 or line is None:
            return [{**base, "error": out[-2000:], "rc": rc}]
        return [{**base, "impl": "jaxgen", **json.loads(line[7:]), "wall_s": round(wall, 1), "load_1m_after": _load(),
                 "command": f"XLA_FLAGS='{flags}' " + " ".join(cmd[1:])}]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "out.json"
        if workload == "var_sample":
            cmd = [sys.executable, "experiments/bench_var_sampling.py", "--config=configs/var_small.py",
                   f"--batch={args.var_batch}", f"--repeats={args.repeats}", f"--out={out_json}"]  # fmt: skip
            if official and args.official_var:
                cmd.append(f"--official={args.official_var}")
        else:
            cmd = [sys.executable, "experiments/bench_llamagen_sampling.py", "--config=configs/llamagen_small.py",
                   f"--batch={args.llamagen_batch}", f"--repeats={args.repeats}", f"--out={out_json}"]  # fmt: skip
            if official and args.official_llamagen:
                cmd += [f"--official={args.official_llamagen}", f"--official-commit={args.official_llamagen_commit}"]
        rc, out, wall = _run(cmd, flags, args.timeout)
        if rc != 0 or not out_json.exists():
            return [{**base, "error": out[-2000:], "rc": rc}]
        report = json.loads(out_json.read_text())
    rows = []
    keep = ("impl", "dtype", "batch", "compile_s", "run_s", "images_per_s", "decode_s", "tokens_per_s",
            "gpt_tokens_per_s", "load_1m", "runs", "torch")  # fmt: skip
    for r in report.get("results", report.get("rows", [])):  # timing.write_report's "results"
        rows.append({**base, **{k: r[k] for k in keep if k in r}, "wall_s": round(wall, 1), "load_1m_after": _load(),
                     "command": f"XLA_FLAGS='{flags}' " + " ".join(cmd[1:])})  # fmt: skip
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Median per (workload, setting, impl, batch) over rounds, and the ratio to the default setting."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        groups.setdefault((r["workload"], r.get("impl"), r.get("batch"), r["setting"]), []).append(r)
    out = []
    for (w, impl, b, s), rs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        metric = "step_s" if w.endswith("_train") else "run_s"
        vals = [r[metric] for r in rs]
        row = {"workload": w, "impl": impl, "batch": b, "setting": s, metric: round(statistics.median(vals), 5),
               "n": len(vals), "all": vals}  # fmt: skip
        if "decode_s" in rs[0]:
            row["decode_s"] = round(statistics.median(r["decode_s"] for r in rs), 5)
        out.append(row)
    ref = {(r["workload"], r["impl"], r["batch"]): r
           for r in out if r["setting"] == "default" and r["impl"] == "jaxgen"}  # fmt: skip
    for r in out:
        d = ref.get((r["workload"], r["impl"], r["batch"]))
        metric = "step_s" if r["workload"].endswith("_train") else "run_s"
        if d and r["impl"] == "jaxgen":
            r["speedup_vs_default"] = round(d[metric] / r[metric], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=15, help="timed train steps per worker")
    p.add_argument("--settings", default="default,no_ynn")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="--repeats of the sampling scripts")
    p.add_argument("--var_batch", default="1,32")
    p.add_argument("--llamagen_batch", default="1")
    p.add_argument("--official_var", default="")
    p.add_argument("--official_llamagen", default="")
    p.add_argument("--official_llamagen_commit", default="")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.steps)), flush=True)
        return 0

    import jax

    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": _device(),
        "jax": jax.__version__,
        "settings": {s: SETTINGS[s] for s in settings},
        "note": "each row is one subprocess; XLA_FLAGS replaced by the setting's flags; the machine may be shared "
        "(load_1m_before / load_1m_after: 2 = the benchmark's own threads on 2 cores)",
        "rows": [],
    }
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            order = settings[rnd % len(settings) :] + settings[: rnd % len(settings)]
            for setting in order:
                rows = run_workload(workload, setting, args, official=rnd == 0 and setting == "default")
                for r in rows:
                    r["round"] = rnd
                    print(json.dumps({k: v for k, v in r.items() if k not in ("command", "step_times")}), flush=True)
                report["rows"] += rows
                report["summary"] = _summary(report["rows"])
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(report, indent=1))
    for r in report["summary"]:
        print("SUMMARY", json.dumps({k: v for k, v in r.items() if k != "all"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
