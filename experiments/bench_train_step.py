"""Train-step speed and memory of VAR-d16 and LlamaGen-B shaped generators, through jaxgen's real train step.

    # memory: per-device argument/temp bytes of the compiled step on 1 device vs fsdp=8 (8 host devices, CPU)
    python experiments/bench_train_step.py --mode=memory --out=experiments/results/train_step_memory_cpu.json
    # speed on the local device (GPU: bf16 and float32; MFU against --peak_tflops)
    python experiments/bench_train_step.py --mode=speed --dtype=bfloat16,float32 --out=...json

Speed: steps/s (median of --repeats timed steps after 2 warm-up steps), tokens/s = batch * seq_len * steps/s, and
model FLOPs utilisation = (6 * trained params * tokens + attention FLOPs) per second / peak; XLA's own count of the
compiled step (`cost_analysis()['flops']`) is reported beside it. Memory: `compiled.memory_analysis()` of the same
step lowered for a 1-device mesh and for fsdp=8 (params, optimizer state and EMA sharded by the 'embed' rule).
"""

from __future__ import annotations

import argparse
import os
import sys

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
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.parallel.rules import DEFAULT_RULES
from jaxgen.train.generator_task import generator_task
from jaxgen.train.optim import make_optimizer
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step

MODELS = {
    "var_d16": ("configs/var_imagenet.py:d16", "var"),
    "llamagen_B": ("configs/llamagen_imagenet.py:B", "llamagen"),
    "var_tiny": ("configs/var_tiny.py", "var"),  # a quick check of the script itself
    "llamagen_tiny": ("configs/llamagen_tiny.py", "llamagen"),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


def _setup(name: str, dtype: str, batch: int) -> dict:
    """The task, a boxed state initialiser, the pure step and abstract inputs for one model."""
    spec, family = MODELS[name]
    cfg = load_config(spec)
    cfg.family = family
    _, tok, gen = build_models(cfg, generator_dtype=dtype)
    fam = FAMILIES[family]
    task = generator_task(fam, tok, gen)
    seq = tok.token_layout(fam.image_size(tok, gen)).num_tokens
    frozen = None
    if family == "var":  # the VQVAE's params feed VAR's teacher-forcing input (LlamaGen's objective reads none)
        image = example_image(fam, tok, gen)
        frozen = partition.strip_boxes(jax.eval_shape(lambda: tok.init(jax.random.key(0), image)["params"]))
    tx = make_optimizer(ml_collections.ConfigDict(train_section(steps=1000, lr=1e-4)))

    def init_boxed(key_data):
        key = jax.random.wrap_key_data(key_data)
        params, model_state = task.init(key)
        return create_state(params, tx, key_data, model_state)

    return dict(
        task=task, gen=gen, family=family, init=init_boxed, seq=seq, vocab=gen.config.vocab_size, frozen=frozen,
        step=make_train_step(task.loss_fn, tx, ema_decay=0.999), batch=batch,
    )  # fmt: skip


def _flops_per_token(params: int, cfg, family: str, seq: int) -> float:
    """Training FLOPs per token: 6 x trained params, plus the attention matmuls (QK^T and AV: 4 * seq * width per
    token and layer forward, x3 with the backward)."""
    layers = cfg.depth if family == "var" else cfg.n_layer
    width = cfg.embed_dim if family == "var" else cfg.dim
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


def memory(args) -> list[dict]:
    rows: list[dict] = []
    for name in args.models.split(","):
        setup = _setup(name, "float32", args.batch)
        for fsdp in (1, 8):
            devices = jax.devices()[:fsdp]
            mesh = mesh_lib.create_mesh({"data": 1, "fsdp": fsdp, "tensor": 1}, devices=devices)
            lowered, _ = _lower(setup, mesh, DEFAULT_RULES)
            mem = lowered.compile().memory_analysis()
            emit(rows, {
                "model": name, "devices": fsdp, "mesh": f"data=1 fsdp={fsdp} tensor=1", "batch": args.batch,
                "argument_bytes_per_device": int(mem.argument_size_in_bytes),
                "output_bytes_per_device": int(mem.output_size_in_bytes),
                "temp_bytes_per_device": int(mem.temp_size_in_bytes),
                "alias_bytes_per_device": int(mem.alias_size_in_bytes),
            })  # fmt: skip
        one, eight = rows[-2:]
        one["argument_bytes_1_over_8"] = round(one["argument_bytes_per_device"] / eight["argument_bytes_per_device"], 2)
    return rows


def _time_step(setup: dict, mesh, repeats: int) -> tuple[float, dict, int]:
    """(median step seconds, XLA cost analysis, trained params) of the compiled step on real arrays."""
    lowered, _ = _lower(setup, mesh, DEFAULT_RULES)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state = partition.init_sharded(setup["init"], mesh, DEFAULT_RULES, jax.random.key_data(jax.random.key(0)))
    rng = np.random.default_rng(0)
    b, seq = setup["batch"], setup["seq"]
    batch = partition.shard_batch(
        {"tokens": rng.integers(0, setup["vocab"], (b, seq)).astype(np.int32),
         "label": rng.integers(0, 10, (b,)).astype(np.int32)}, mesh, DEFAULT_RULES)  # fmt: skip
    frozen = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup["frozen"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    holder = [state]

    def run(_):
        holder[0], metrics = compiled(holder[0], batch, frozen)
        return jax.block_until_ready(metrics["loss"])

    run(-1)
    step_s, _ = median_time(run, repeats)
    return step_s, cost, n_params


def speed(args) -> list[dict]:
    rows: list[dict] = []
    mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), 0.0)
    for name in args.models.split(","):
        for dtype in args.dtype.split(","):
            setup = _setup(name, dtype, args.batch)
            step_s, cost, n_params = _time_step(setup, mesh, args.repeats)
            seq, b = setup["seq"], args.batch
            model_flops = _flops_per_token(n_params, setup["gen"].config, setup["family"], seq) * b * seq
            emit(rows, {
                "model": name, "dtype": dtype, "batch": b, "seq_len": seq, "params": n_params,
                "step_s": round(step_s, 5), "steps_per_s": round(1 / step_s, 3),
                "tokens_per_s": round(b * seq / step_s, 1),
                "model_tflops_per_step": round(model_flops / 1e12, 3),
                "xla_tflops_per_step": round(float(cost.get("flops", 0.0)) / 1e12, 3),
                "achieved_tflops": round(model_flops / step_s / 1e12, 2),
                "peak_bf16_tflops": peak,
                "mfu": round(model_flops / step_s / 1e12 / peak, 4) if peak else None,
            })  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("memory", "speed"), required=True)
    p.add_argument("--models", default="var_d16,llamagen_B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak of the device (default: by name)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = memory(args) if args.mode == "memory" else speed(args)
    write_report(f"train_step_{args.mode}", args.out, rows, args=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
