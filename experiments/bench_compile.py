"""Compile time of a config's sampler and train step, unrolled or scanned (`scan_layers`).

    python experiments/bench_compile.py --config=configs/var_imagenet.py:d16 --out=unrolled.json
    python experiments/bench_compile.py --config=configs/var_imagenet.py:d16 --config.var.scan_layers=True \
        --out=scanned.json

Lowers and compiles, on this process's devices (CPU here) and with the persistent compile cache off:
  - "sampler": the family's sampler for `--sample_batch` labels (default: the config's grid), random weights, as
    `jaxgen.sample` runs it (its jitted function, from abstract inputs: nothing is sampled);
  - "train_step": the first generator stage's step as `jaxgen.train.loop` builds it (`plan_stage`), at
    `--train_batch` (default 8: compile time hardly depends on the batch; the config's 768 would not fit in 24 GiB).
Each row has `lower_s` (trace + StableHLO), `xla_s` (XLA's compile) and `compile_s`, their sum: what a user waits
before the first step. With `--repeats=N` the compiled program also runs N times on random params and inputs
(after one warm-up call) and the row gets `run_s`, the median seconds per call: what the layout costs at run time.
Writes `{"rows": [{"what": "sampler" | "train_step", "compile_s": ...}, ...], ...}`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "write the JSON here")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 0, "sampler labels (0: the config's grid)")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 8, "train-step global batch")
_WHAT = flags.DEFINE_list("what", ["sampler", "train_step"], "programs to compile")
_REPEATS = flags.DEFINE_integer("repeats", 0, "also run each compiled program this many times (0: compile only)")


def _timed_compile(lower, runner=None) -> dict:
    """Lower and compile; with --repeats and `runner(compiled) -> call(i)` (one run on concrete inputs, built after
    the compile), time the runs too."""
    import jax

    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    row = {
        "lower_s": round(t1 - t0, 2),
        "xla_s": round(t2 - t1, 2),
        "compile_s": round(t2 - t0, 2),
        "hlo_lines": lowered.as_text().count("\n"),
        "flops": float(cost.get("flops", 0.0)),
    }
    if _REPEATS.value and runner is not None:
        call = runner(compiled)
        times = []
        for i in range(_REPEATS.value + 1):
            t = time.perf_counter()
            jax.block_until_ready(call(i))
            times.append(time.perf_counter() - t)
        row["run_s"] = round(sorted(times[1:])[len(times[1:]) // 2], 4)
    return row


def sampler_row(family, tokenizer, generator, tok_params, config, stage, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    sampler = family.sampler(generator, tokenizer, stage.sampling(config.sampling.to_dict()))
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    gen = jax.eval_shape(lambda: generator.init(jax.random.key(0), *family.generator_inputs(generator))["params"])
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def runner(compiled):
        params = generator.init(jax.random.key(1), *family.generator_inputs(generator))["params"]
        labels_b = jnp.arange(batch, dtype=jnp.int32) % max(int(generator.config.num_classes), 1)
        return lambda i: compiled(params, tok_params, labels_b, jax.random.key(i)).images

    row = _timed_compile(lambda: sampler._fn.lower(gen, abstract(tok_params), labels, key), runner)
    return {"what": "sampler", "batch": batch, **row}


def train_step_program(family, tokenizer, generator, tok_params, config, stage, batch: int) -> dict:
    """The first generator stage's step as `jaxgen.train.loop` builds it, on this process's devices, and its
    abstract inputs: {"task", "plan", "mesh", "rules", "batch_in" (token ids [B, L] as pretokenizing writes them,
    labels [B]), "frozen"} (also used by bench_compile_cache.py)."""
    import jax
    import numpy as np

    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel.rules import rules_from_config
    from jaxgen.train.generator_task import generator_task
    from jaxgen.train.loop import plan_stage

    tc = config[f"train_{stage.name}"]
    mesh = mesh_lib.create_mesh({"data": -1})
    rules = rules_from_config(config.parallel.rules)
    task = generator_task(family, tokenizer, generator, tok_params, stage)
    plan = plan_stage(task, tc, mesh=mesh, rules=rules, seed=0)
    size = family.image_size(tokenizer, generator)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
    tokens = jax.eval_shape(lambda p, x: tokenizer.apply({"params": p}, x, method="encode_ids"), tok_params, image)
    sds = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    batch_in = {
        task.batch_key: sds(tokens, plan.batch_shardings[task.batch_key]),
        "label": sds(jax.ShapeDtypeStruct((batch,), np.int32), plan.batch_shardings["label"]),
    }
    frozen = jax.tree.map(sds, tok_params, plan.frozen_shardings)
    return {"task": task, "plan": plan, "mesh": mesh, "rules": rules, "batch_in": batch_in, "frozen": frozen}


def train_step_row(family, tokenizer, generator, tok_params, config, stage, batch: int) -> dict:
    import jax
    import numpy as np

    from jaxgen.parallel import partition

    program = train_step_program(family, tokenizer, generator, tok_params, config, stage, batch)
    task, plan, mesh, rules = program["task"], program["plan"], program["mesh"], program["rules"]
    batch_in, frozen = program["batch_in"], program["frozen"]
    tokens = batch_in[task.batch_key]

    def runner(compiled):
        state = [partition.init_sharded(plan.init_state, mesh, rules, plan.key_data)]
        rng = np.random.default_rng(0)
        vocab = int(getattr(tokenizer, "vocab_size", 0) or 2)
        data = {task.batch_key: rng.integers(0, vocab, tokens.shape).astype(np.int32),
                "label": rng.integers(0, 2, (batch,)).astype(np.int32)}  # fmt: skip
        data = {k: jax.device_put(v, plan.batch_shardings[k]) for k, v in data.items()}
        frozen_in = jax.device_put(tok_params, plan.frozen_shardings)

        def call(i):  # the state is donated: each call takes the last one's
            state[0], metrics = compiled(state[0], data, frozen_in)
            return metrics["loss"]

        return call

    with partition.activation_rules(mesh, rules):
        row = _timed_compile(lambda: plan.jit_step().lower(plan.abstract_state, batch_in, frozen), runner)
    return {"what": "train_step", "batch": batch, "stage": stage.name, **row}


def main(argv) -> None:
    del argv
    import jax

    from jaxgen.families import family_models, init_family_params, model_sections
    from jaxgen.parallel import distributed

    distributed.enable_compile_cache("off")
    config = _CONFIG.value
    family, sections = model_sections(config)
    stage = family.generator_stages()[0]
    tc = config[f"train_{stage.name}"]
    tokenizer, generator = family_models(family, sections, generator_dtype=tc.compute_dtype)
    tok_params = init_family_params(family, tokenizer, generator, 0)[family.tokenizer_key]
    gen_section = sections[family.generator_key]
    grid = len(tuple(config.grid.classes)) * int(config.grid.per_class)
    rows = []
    report = {
        "benchmark": "compile time",
        "command": " ".join(["python", *sys.argv]),
        "config": next((a for a in sys.argv if a.startswith("--config=")), ""),
        "family": family.name,
        "scan_layers": bool(gen_section.get("scan_layers", False)),
        "remat": gen_section.get("remat", "none"),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "rows": rows,
    }
    for what in _WHAT.value:
        if what == "sampler":
            rows.append(sampler_row(family, tokenizer, generator, tok_params, config, stage,
                                    _SAMPLE_BATCH.value or grid))  # fmt: skip
        elif what == "train_step":
            rows.append(train_step_row(family, tokenizer, generator, tok_params, config, stage, _TRAIN_BATCH.value))
        else:
            raise app.UsageError(f"--what: {what!r} is not sampler or train_step")
        print(json.dumps(rows[-1]), flush=True)
        report["total_compile_s"] = round(sum(r["compile_s"] for r in rows), 2)
        if _OUT.value:  # after every row: a run cut short by a time limit keeps what it measured
            Path(_OUT.value).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"total_compile_s": report["total_compile_s"]}))


if __name__ == "__main__":
    app.run(main)
