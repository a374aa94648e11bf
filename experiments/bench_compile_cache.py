"""The persistent compilation cache: compile time of the sampler and the train step in a first and a second process.

    python experiments/bench_compile_cache.py --config=configs/digits_var.py --config=configs/var_imagenet.py:d16 \
        --out=experiments/results/compile_cache_cpu.json

For each config, three fresh processes run the same program: one with the cache off, then two that share a new,
empty cache directory (what `jaxgen.main` / `jaxgen.sample` do by default with `--compile_cache`). Each process
times (a) the sampler's first call minus its second (the compile; the grid's labels, random weights) and (b)
`jit(train_step).lower(...).compile()` of the config's first generator stage, as `jaxgen.train.loop` builds it
(`plan_stage`), on this process's devices. The second process should load both from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(spec: str, cache: str, batch: int | None) -> dict:
    """One process: compile times in seconds with the cache at `cache` ('off': none)."""
    import jax
    import numpy as np
    from bench_compile import train_step_program  # the train step and its abstract inputs, as bench_compile.py

    from jaxgen.config_util import load_config
    from jaxgen.families import family_models, init_family_params, model_sections
    from jaxgen.parallel import distributed, partition

    distributed.enable_compile_cache(cache)
    config = load_config(spec)
    family, sections = model_sections(config)
    stage = family.generator_stages()[0]
    tc = config[f"train_{stage.name}"]
    tokenizer, generator = family_models(family, sections, generator_dtype=tc.compute_dtype)
    params = init_family_params(family, tokenizer, generator, int(config.seed))
    tok_params, gen_params = params[family.tokenizer_key], params[family.generator_key]

    labels = np.repeat(np.asarray(tuple(config.grid.classes), np.int32), int(config.grid.per_class))
    sampler = family.sampler(generator, tokenizer, stage.sampling(config.sampling.to_dict()))
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(gen_params, tok_params, labels, jax.random.key(i)).images)
        times.append(time.perf_counter() - t0)

    batch = batch or int(tc.batch_size)
    program = train_step_program(family, tokenizer, generator, tok_params, config, stage, batch)
    plan = program["plan"]
    with partition.activation_rules(program["mesh"], program["rules"]):
        lowered = plan.jit_step().lower(plan.abstract_state, program["batch_in"], program["frozen"])
        t0 = time.perf_counter()
        lowered.compile()
        train_compile = time.perf_counter() - t0
    return {
        "sampler_first_call_s": round(times[0], 3),
        "sampler_second_call_s": round(times[1], 3),
        "sampler_compile_s": round(times[0] - times[1], 3),
        "train_step_compile_s": round(train_compile, 3),
        "train_batch": batch,
        "cache": cache,
        "cache_entries": len(os.listdir(cache)) if cache != "off" else 0,
    }


def run_child(spec: str, cache: str, batch: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", f"--config={spec}", f"--cache={cache}"]
    cmd += [f"--batch={batch}"] if batch else []
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed ({spec}, cache {cache}):\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="configs/NAME.py[:variant]; repeat for several")
    parser.add_argument("--batch", type=int, default=None, help="train-step batch (default: the config's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        print(json.dumps(child(args.config[0], args.cache, args.batch)))
        return
    import jax

    rows = []
    for spec in args.config or ["configs/digits_var.py"]:
        with tempfile.TemporaryDirectory(prefix="jaxgen_cache_") as cache:
            runs = {
                "no_cache": run_child(spec, "off", args.batch),
                "first": run_child(spec, cache, args.batch),
                "second": run_child(spec, cache, args.batch),
            }
        row = {"config": spec, **runs}
        for what in ("sampler_compile_s", "train_step_compile_s"):
            row[f"{what}_first_over_second"] = round(runs["first"][what] / max(runs["second"][what], 1e-3), 1)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
