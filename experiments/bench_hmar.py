"""HMAR beside VAR and beside the official NVlabs/HMAR code: train-step time, sampling images/s and memory.

    python experiments/bench_hmar.py --size=small --official=.upstream/hmar \
        --out=experiments/results/hmar_bench_cpu.json
    python experiments/bench_hmar.py --size=d16 --official=.upstream/hmar --out=$OUT/hmar_bench_gpu.json  # GPU, bf16
    python experiments/bench_hmar.py --quick [--official=.upstream/hmar]                                 # smoke

Rows (`part`, `model`, `what`); the JSON is rewritten after every group of rows (a time limit keeps the rows done).
Rows of a group are timed round by round (one run of each in turn, `time_rounds`), so that on a shared machine they
see the same load; `ratios` gives each comparison from the medians and (`_rounds`) as the median of per-round ratios:

- `train`: jaxgen's real train step (`jaxgen.train.step.make_train_step` + the stage's optimizer: forward, backward,
  clip, AdamW, EMA, state donated) of HMAR stage 1 (`families.hmar.next_scale_objective`, model `hmar`), VAR
  (`families.var.objective`, model `var`) at the same depth / width / patch_nums, and HMAR stage 2
  (`families.hmar.mask_objective`, model `hmar_mask`: the mask branch trained, the rest frozen), each with every
  `--backends` entry of `NextScaleConfig.attn_backend` ("xla" dense masked, "pallas" block-sparse; on a CPU the Pallas
  kernel runs in interpret mode, which times the algorithm as XLA CPU ops, not a kernel). ms/step = median of
  --repeats rounds after two warm-ups; compile_s apart; `memory` = XLA's `memory_analysis()` of the compiled step;
  --interleave rows per group in the order HMAR pallas, VAR xla (the headline pair), VAR pallas, HMAR xla, stage 2.
  `ratios.train` gives VAR / HMAR step time per backend and the headline VAR dense-masked (xla) / HMAR pallas.
- `sample`: images/s of jaxgen's `HMARSampler` (refine=True, the mask schedule below) and of the official
  `HMAR.generate(mask=True, kv_cache=False)` with the same sizes, settings and schedule (random weights; different
  RNGs, so not the same tokens); model `var`: jaxgen's VAR sampler and upstream's own "VAR" mode of its inference
  benchmark (`HMAR.generate(mask=False, kv_cache=True)`: the next-scale branch with a KV cache = VAR), both with
  VAR's demo settings (`bench_var_sampling.SETTINGS`, which upstream's benchmark/inference.py also uses). A sample
  is label -> image (the VQVAE decoder included); `decode_s` is the decoder alone for the batch.
- `official_train` (with --official): upstream's benchmark/training.py logic, stage-1 `NextScalePrediction`
  forward + `backward(do)` (no optimizer), `using_block_sparse_attn=True` (the Triton kernel; on a CPU the stand-in
  below, so the row only checks that the path runs) beside SDPA + the block-diagonal mask. On a GPU under fp16
  autocast as upstream's benchmark (the kernel casts P to fp16: it has no bf16 path).

Memory: on a GPU, jaxgen `memory_stats()['peak_bytes_in_use']` (JAX cannot reset it: a process-wide high-water mark,
the sampling rows run before the train rows) and the compiled program's `memory_analysis()` (arguments + outputs +
temporaries - aliased: exact, weights included); torch `max_memory_allocated()` after `reset_peak_memory_stats()`
(weights included). On a CPU: `rss_peak_delta_bytes`, the resident set's peak, sampled every 2 ms during the first
(warm-up) run, minus its value just before it; the weights are already resident and the allocators keep freed
memory, so it is a lower bound of the working memory, approximate. Threads: torch.set_num_threads(--torch-threads,
default os.cpu_count()) with OMP_WAIT_POLICY=PASSIVE on a CPU (--omp-wait-policy; measured here under other
sessions' load, 2 threads: a tiny fwd+bwd took 11 ms passive, 29-360 ms spinning, 7 ms on 1 thread); XLA:CPU's pool
uses every core too.

The mask schedule (`--schedule`): "released" = upstream's default sampling schedule
(`utils/sampling_arg_util.py`, `sampling.hmar.RELEASED_SCHEDULE`) row for row where the scale sides equal the
released ones, `(p^2,)` (no refinement) elsewhere; "benchmark" = benchmark/inference.py's 256 px schedule treated the
same way. The official code is imported from --official (upstream has no setup.py; nothing of it is in this repo),
with these shims where the machine lacks what it needs (listed in the JSON): empty `wandb` / `torchvision` / `pytz`
modules and a `tap` module with an empty `Tap` class for `utils/misc.py` -> `utils/arg_util.py` (nothing used by the
rows); without CUDA, a stand-in for `attn/block_sparse_attn_triton.py` (masked SDPA with the kernel's per-row
[row_start, row_end) key intervals) registered before the import, and `BlockSparseAttention` built with its index
vectors on the CPU. With --official, JAX's GPU preallocation is capped at 45% (XLA_PYTHON_CLIENT_MEM_FRACTION) so
that torch has room in the same process.
"""

from __future__ import annotations

import os
import sys

if any(a.startswith("--official") for a in sys.argv):
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse
import ctypes
import dataclasses
import gc
import statistics
import threading
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from bench_maskgit_sampling import checkout_commit
from bench_train_step import _lower
from bench_var_sampling import SETTINGS as VAR_SETTINGS
from timing import OFFICIAL, compile_timed, emit, torch_sync, write_report

from jaxgen.config_util import load_config
from jaxgen.convert.common import count_params
from jaxgen.families import FAMILIES, example_image, family_models, param_shapes
from jaxgen.models.registry import init_params
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.parallel.rules import DEFAULT_RULES
from jaxgen.sampling.hmar import RELEASED_PATCH_NUMS, RELEASED_SCHEDULE, HMARSampler, HMARSampling
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.train.generator_task import generator_task
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step

SIZES = {
    # CI / suite smoke: seconds per row on a CPU
    "quick": dict(config="configs/var_small.py", patch_nums=(1, 2, 3, 4), depth=2, embed_dim=64, num_heads=2,
                  mask_layers=1, train_batch=2, sample_batch=(1, 2), dtype="float32"),
    # two CPU cores: VAR-small's VQVAE (128 px, 7 scales, vocab 4096) under a depth-4, width-256 trunk, L = 155
    "small": dict(config="configs/var_small.py", patch_nums=None, depth=4, embed_dim=256, num_heads=4,
                  mask_layers=2, train_batch=8, sample_batch=(1, 16), dtype="float32"),
    # HMAR-d16 / VAR-d16 at 256 px (10 scales, L = 680), the released sizes; bf16 compute (float32 params)
    "d16": dict(config="configs/var_imagenet.py:d16", patch_nums=None, depth=16, embed_dim=1024, num_heads=16,
                mask_layers=8, train_batch=16, sample_batch=(1, 16), dtype="bfloat16"),
}  # fmt: skip
# upstream's benchmark/inference.py 256 px schedule (its default sampling schedule is RELEASED_SCHEDULE)
BENCHMARK_SCHEDULE = ((1,), (1, 3), (1, 3, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))
SCHEDULES = {"released": RELEASED_SCHEDULE, "benchmark": BENCHMARK_SCHEDULE}
HMAR_SETTINGS = dict(cfg=1.7, top_k=1000, top_p=0.99)  # the released d16 sampling config (HMARSampling's defaults)
TARGETS = {
    "train_var_xla_over_hmar_pallas": 2.5,  # GPU, d16: HMAR's step >= 2.5x faster than VAR's dense-masked one
    "sample_jaxgen_over_official": 1.0,  # HMAR sampling images/s >= the official code's
}


def schedule_for(patch_nums, name: str) -> tuple[tuple[int, ...], ...]:
    """The named upstream schedule, row for row where the side matches the released scale list, (p^2,) elsewhere."""
    rows = SCHEDULES[name]
    return tuple(
        rows[i] if i < len(RELEASED_PATCH_NUMS) and RELEASED_PATCH_NUMS[i] == p else (p * p,)
        for i, p in enumerate(patch_nums)
    )


# ---- jaxgen models --------------------------------------------------------------------------------------------------
def sections(sz: dict, family: str, backend: str = "xla") -> dict:
    """{"vae": ..., "var" | "hmar": ...} of the size preset: the config's VQVAE (patch_nums replaced) and its VAR
    section with the preset's trunk (+ HMAR's mask_layers)."""
    cfg = load_config(sz["config"])
    vae = cfg.vae.to_dict()
    if sz["patch_nums"]:
        vae["patch_nums"] = tuple(sz["patch_nums"])
    gen = cfg.var.to_dict()
    gen.update(depth=sz["depth"], embed_dim=sz["embed_dim"], num_heads=sz["num_heads"], attn_backend=backend)
    if family == "hmar":
        gen["mask_layers"] = sz["mask_layers"]
    return {"vae": vae, FAMILIES[family].generator_key: gen}


def models(sz: dict, family: str, backend: str = "xla", dtype: str = "float32"):
    return family_models(FAMILIES[family], sections(sz, family, backend), dtype, dtype)


# ---- interleaved rounds ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Bench:
    """One row to time: `first()` is the first (warm-up) run and returns its memory fields, `run(i)` one more run
    (blocking), `finish(median_s)` the row's remaining fields."""

    row: dict
    run: Callable[[int], object]
    first: Callable[[], dict]
    finish: Callable[[float], dict]
    warmups: int = 1  # runs before the timed rounds, the first included


def time_rounds(
    benches: list, repeats: int, add: Callable[[dict], None], fail: Callable[[dict, Exception], None], group: int
) -> None:
    """Warm each bench up, then `repeats` rounds of one timed run of every bench in turn, so that on a shared
    machine every row of the group sees the same load (a row that raises is dropped, the others go on). Each row
    gets `finish(median round time)` (ms_per_step or run_s / images_per_s), every round's time (`round_times_s`)
    and the `group` it was timed in; a dict instead of a Bench is a finished row (`--lower-only`)."""
    live = []
    for b in benches:
        if isinstance(b, dict):
            add(b)
            continue
        try:
            b.row.update(b.first())
            for k in range(b.warmups - 1):
                b.run(-2 - k)
            live.append(b)
        except Exception as e:  # a failed row is recorded, the others still run
            fail(b.row, e)
    times: dict[int, list[float]] = {id(b): [] for b in live}
    for i in range(1, repeats + 1):
        for b in list(live):
            try:
                t0 = time.perf_counter()
                b.run(i)
                times[id(b)].append(time.perf_counter() - t0)
            except Exception as e:
                fail(b.row, e)
                live.remove(b)
    for b in live:
        t = times[id(b)]
        med = statistics.median(t)
        try:
            add({**b.row, **b.finish(med), "runs": len(t), "round_times_s": [round(x, 5) for x in t], "group": group})
        except Exception as e:
            fail(b.row, e)


def round_ratio(num: dict | None, den: dict | None) -> float | None:
    """Median over shared rounds of num's time / den's time (rows timed in the same group), else None."""
    if not num or not den or "round_times_s" not in num or "round_times_s" not in den:
        return None
    if num["group"] != den["group"]:
        return None
    pairs = list(zip(num["round_times_s"], den["round_times_s"], strict=False))
    return round(statistics.median(a / b for a, b in pairs), 3) if pairs else None


# ---- train step -----------------------------------------------------------------------------------------------------
TRAIN_MODELS = {"hmar": ("hmar", 0), "var": ("var", 0), "hmar_mask": ("hmar", 1)}  # row model -> (family, stage)


def train_bench(sz: dict, model: str, backend: str, dtype: str, batch: int, lower_only=False) -> Bench | dict:
    family, stage_i = TRAIN_MODELS[model]
    fam = FAMILIES[family]
    tok, gen = models(sz, family, backend, dtype)
    stage = fam.generator_stages()[stage_i]
    stage = dataclasses.replace(stage, start=None)  # stage 2 from a random init: the same step, no stage-1 export
    task = generator_task(fam, tok, gen, stage=stage)
    tx = task.optimizer(ml_collections.ConfigDict(train_section(steps=1000, lr=1e-4)))
    image = example_image(fam, tok, gen)
    frozen = partition.strip_boxes(jax.eval_shape(lambda: tok.init(jax.random.key(0), image)["params"]))

    def init_boxed(key_data):
        params, model_state = task.init(jax.random.wrap_key_data(key_data))
        return create_state(params, tx, key_data, model_state)

    seq = tok.token_layout(fam.image_size(tok, gen)).num_tokens
    setup = dict(init=init_boxed, batch=batch, seq=seq, frozen=frozen,
                 step=make_train_step(task.loss_fn, tx, ema_decay=0.999))  # fmt: skip
    mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    t0 = time.perf_counter()
    lowered, _ = _lower(setup, mesh, DEFAULT_RULES)  # bench_train_step's: shardings, donated state
    row = {"part": "train", "impl": "jaxgen", "model": model, "what": "train_step", "stage": stage.name,
           "attn_backend": backend, "pallas_interpret": backend == "pallas" and jax.default_backend() == "cpu",
           "dtype": dtype, "batch": batch, "seq_len": seq}  # fmt: skip
    if lower_only:
        return {**row, "lowered_only": True, "lower_s": round(time.perf_counter() - t0, 3)}
    compiled, compile_s = compile_timed(lowered)
    mem = compiled.memory_analysis()
    state = partition.init_sharded(init_boxed, mesh, DEFAULT_RULES, jax.random.key_data(jax.random.key(0)))
    rng = np.random.default_rng(0)
    c = gen.config
    data = {"tokens": rng.integers(0, c.vocab_size, (batch, seq)).astype(np.int32),
            "label": rng.integers(0, c.num_classes, (batch,)).astype(np.int32)}  # fmt: skip
    data = partition.shard_batch(data, mesh, DEFAULT_RULES)
    frozen_arrays = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), frozen)
    holder = [state]

    def run(_):
        holder[0], metrics = compiled(holder[0], data, frozen_arrays)
        return jax.block_until_ready(metrics["loss"])

    trained = sum(int(np.prod(x.shape)) for k, v in state.params.items() if stage.trainable(k)
                  for x in jax.tree.leaves(v))  # fmt: skip
    row.update(params=count_params(state.params), trained_params=trained, compile_s=round(compile_s, 3),
               memory={"argument_bytes": int(mem.argument_size_in_bytes),
                       "output_bytes": int(mem.output_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                       "alias_bytes": int(mem.alias_size_in_bytes)})  # fmt: skip

    def finish(step_s):
        holder.clear()  # the state's memory back before the next group
        return {"ms_per_step": round(step_s * 1e3, 3), "tokens_per_s": round(batch * seq / step_s, 1)}

    return Bench(row, run, lambda: (run(-1), {})[1], finish, warmups=2)


# ---- memory ---------------------------------------------------------------------------------------------------------
class RssPeak:
    """Peak resident set size of this process during a `with` block, sampled every `interval` s (Linux /proc)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.before = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        try:  # hand the memory glibc keeps from earlier rows back to the OS, so that the baseline is what is in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.before = self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.before


def jax_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def memory_fields(run_first, compiled=None) -> dict:
    """Run `run_first()` (the first, warm-up run) measuring memory the device's way; + XLA's analysis of `compiled`."""
    out = {}
    if compiled is not None:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        out["xla_program_bytes"] = int(total)
        out["xla_temp_bytes"] = int(m.temp_size_in_bytes)
    if jax.default_backend() == "cpu":
        with RssPeak() as rss:
            run_first()
        out["rss_peak_delta_bytes"] = rss.delta
    else:
        run_first()
        out["jax_peak_bytes_in_use_process"] = jax_peak_bytes()
    return out


# ---- jaxgen sampling ------------------------------------------------------------------------------------------------
def sampler_bench(sz: dict, model: str, schedule, dtype: str, batch: int, lower_only=False) -> Bench | dict:
    """jaxgen's HMARSampler (model "hmar", refine=True, the schedule) or NextScaleSampler (model "var", VAR's demo
    settings), label -> image, jitted; + the VQVAE decoder alone (`decode_s`)."""
    fam = FAMILIES[model]
    tok, gen = models(sz, model, "xla", dtype)  # sampling never runs a masked attention: any backend
    if model == "hmar":
        sampler = HMARSampler(gen, tok, HMARSampling(**HMAR_SETTINGS, refine=True, mask_schedule=schedule))
    else:
        sampler = NextScaleSampler(gen, tok, NextScaleSampling(**VAR_SETTINGS))
    labels = jnp.arange(batch, dtype=jnp.int32) % gen.config.num_classes
    row = {"part": "sample", "impl": "jaxgen", "model": model, "what": "sample", "dtype": dtype, "batch": batch}
    if lower_only:  # abstract params: nothing allocated
        shapes = param_shapes(fam, tok, gen)
        t0 = time.perf_counter()
        sampler.lower(shapes[fam.generator_key], shapes["vae"], labels, jax.random.key(0))
        return {**row, "lowered_only": True, "lower_s": round(time.perf_counter() - t0, 3)}
    tp = init_params(tok, jax.random.key(0), example_image(fam, tok, gen))
    gp = init_params(gen, jax.random.key(1), *fam.generator_inputs(gen))
    compiled, compile_s = compile_timed(sampler.lower(gp, tp, labels, jax.random.key(0)))
    row.update(compile_s=round(compile_s, 3), params=count_params(gp))
    run = lambda i: jax.block_until_ready(compiled(gp, tp, labels, jax.random.key(i)).images)
    # the VQVAE decoder alone (f_hat -> image), as bench_var_sampling: splits the time between convnet and sampler
    decode = jax.jit(lambda p, f: tok.apply({"params": p}, f, method=MultiScaleVQVAE.fhat_to_img))
    pn = gen.config.patch_nums[-1]
    f_hat = jnp.zeros((batch, pn, pn, gen.config.z_channels))

    def finish(run_s):
        decode_s = median_of(lambda: jax.block_until_ready(decode(tp, f_hat)), 3)
        return {"run_s": round(run_s, 5), "images_per_s": round(batch / run_s, 3), "decode_s": round(decode_s, 5)}

    return Bench(row, run, lambda: memory_fields(lambda: run(-1), compiled), finish)


def median_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the official code ----------------------------------------------------------------------------------------------
def _stand_in_kernel(q, k, v, row_starts, row_ends, cum_sums, sm_scale, sparsity_pattern):
    """What the Triton kernel computes: query row i attends to keys [row_starts[i], row_ends[i])."""
    import torch
    import torch.nn.functional as F

    j = torch.arange(k.shape[-2], device=q.device)
    visible = (j[None, :] >= row_starts[:, None].long()) & (j[None, :] < row_ends[:, None].long())
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=sm_scale)


def import_official(checkout: str) -> tuple[types.ModuleType, list[str]]:
    """Upstream's `models` package from the checkout, with the shims the machine needs (returned as a list)."""
    import importlib.util

    import torch

    shims = []
    for name in ("wandb", "torchvision", "pytz", "tap"):
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            if name == "tap":
                module.Tap = type("Tap", (), {})
            sys.modules[name] = module
            shims.append(f"empty module {name}" + (" (class Tap)" if name == "tap" else ""))
    path = str(Path(checkout).absolute())
    if path not in sys.path:
        sys.path.insert(0, path)  # upstream imports itself as `models.*`, `attn.*`, `utils.*`, `dist`
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        stand_in = types.ModuleType("attn.block_sparse_attn_triton")
        stand_in.block_sparse_attn_func = _stand_in_kernel
        sys.modules["attn.block_sparse_attn_triton"] = stand_in  # before anything imports the interface
        shims.append("attn.block_sparse_attn_triton: masked-SDPA stand-in (no CUDA or no Triton)")
    if not torch.cuda.is_available():
        import attn.block_sparse_attn_interface as bsa

        init = bsa.BlockSparseAttention.__init__
        bsa.BlockSparseAttention.__init__ = lambda self, block_sizes, device="cpu", **kw: init(
            self, block_sizes, device=device, **kw
        )
        shims.append("BlockSparseAttention index vectors on the CPU")
    import models as upstream

    return upstream, shims


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_memory(run_first, device: str) -> dict:
    import torch

    if device == "cpu":
        with RssPeak() as rss:
            run_first()
        return {"rss_peak_delta_bytes": rss.delta}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_first()
    peak = torch.cuda.max_memory_allocated()
    return {"torch_max_memory_allocated_bytes": int(peak), "torch_peak_over_resident_bytes": int(peak - before)}


def official_vae(up, sz: dict, device: str):
    v = sections(sz, "hmar")["vae"]
    return up.VQVAE(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"], test_mode=True,
                    share_quant_resi=v["share_quant_resi"], v_patch_nums=tuple(v["patch_nums"])).to(device)  # fmt: skip


def trunk_kwargs(sz: dict) -> dict:
    t = sections(sz, "hmar")["hmar"]
    return dict(num_classes=t["num_classes"], depth=t["depth"], embed_dim=t["embed_dim"], num_heads=t["num_heads"],
                mlp_ratio=t["mlp_ratio"], norm_eps=t["norm_eps"], shared_aln=t["shared_aln"],
                attn_l2_norm=t["attn_l2_norm"], flash_if_available=True, fused_if_available=True,
                patch_nums=tuple(sections(sz, "hmar")["vae"]["patch_nums"]))  # fmt: skip


def official_hmar(up, sz: dict, dtype: str):
    """Upstream's VQVAE + HMAR (random weights, torch's default init), eval mode; one pair serves both of its
    generate modes, as in its benchmark/inference.py."""
    import torch

    device = torch_device()
    vae = official_vae(up, sz, device)
    model = up.HMAR(vae, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, cond_drop_rate=0.0,
                    n_layers_train=sz["mask_layers"], **trunk_kwargs(sz)).to(device).eval()  # fmt: skip
    if dtype == "bfloat16":  # under autocast, generate scatters the float32 mask_embed into bf16 word_embed outputs
        model.mask_embed.to(torch.bfloat16)
    return vae, model


def official_sampler_bench(pair, dtype: str, batch: int, schedule, what: str) -> Bench:
    """Upstream's HMAR.generate: what "hmar" = mask=True, kv_cache=False with the schedule, HMAR's settings;
    "var" = mask=False, kv_cache=True (its benchmark's VAR), VAR's demo settings."""
    import torch

    vae, model = pair
    device = torch_device()
    bf16 = dtype == "bfloat16"
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    labels = torch.arange(batch, device=device) % model.num_classes
    if what == "hmar":
        kw = dict(HMAR_SETTINGS, mask=True, mask_schedule=[list(r) for r in schedule], kv_cache=False)
    else:
        kw = dict(VAR_SETTINGS, mask=False, mask_schedule=None, kv_cache=True)

    def run(seed):
        with torch.inference_mode(), amp:
            model.generate(batch, labels, g_seed=max(seed, 0), more_smooth=False, **kw)
        torch_sync(device)

    patch = model.patch_nums[-1]
    f_hat = torch.zeros(batch, model.Cvae, patch, patch, device=device)

    def decode():
        with torch.inference_mode(), amp:
            vae.fhat_to_img(f_hat)
        torch_sync(device)

    row = {
        "part": "sample", "impl": OFFICIAL, "model": what, "what": "sample", "dtype": dtype, "batch": batch,
        "generate_kwargs": {k: v for k, v in kw.items() if k != "mask_schedule"},
        **({"precision": "torch.autocast(bfloat16), mask_embed cast to bfloat16"} if bf16 else {}),
        "torch_device": device, "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    finish = lambda run_s: {"run_s": round(run_s, 5), "images_per_s": round(batch / run_s, 3),
                            "decode_s": round(median_of(decode, 3), 5)}  # fmt: skip
    return Bench(row, run, lambda: torch_memory(lambda: run(-1), device), finish)


def official_train_bench(up, sz: dict, block_sparse: bool, batch: int) -> Bench:
    """Upstream's benchmark/training.py: stage-1 NextScalePrediction forward + backward(do) (no optimizer), fp16
    autocast on a GPU (the Triton kernel's only precision; float32 on a CPU), SDPA + mask or the kernel."""
    import torch

    device = torch_device()
    vae = official_vae(up, sz, device)
    dpr = sections(sz, "hmar")["hmar"]["drop_path_rate"]
    nsp = up.NextScalePrediction(vae, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=dpr, cond_drop_rate=0.1,
                                 using_block_sparse_attn=block_sparse, **trunk_kwargs(sz)).to(device)  # fmt: skip
    nsp.init_weights(init_std=-1)
    nsp.train()
    gpu = device == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    x = torch.randn(batch, nsp.L - nsp.first_l, nsp.Cvae, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, nsp.num_classes, (batch,), device=device)
    do = torch.rand(batch, nsp.L, nsp.V, device=device, dtype=torch.float32)

    def run(_):
        nsp.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=gpu):
            out = nsp(labels, x)
        out.backward(do)
        torch_sync(device)

    stand_in = sys.modules["attn.block_sparse_attn_triton"].block_sparse_attn_func is _stand_in_kernel
    kernel = "stand_in" if stand_in else "triton"
    row = {
        "part": "official_train", "impl": OFFICIAL, "model": "hmar", "what": "fwd_bwd",
        "attention": f"block_sparse_{kernel}" if block_sparse else "sdpa_mask", "dtype": str(dtype).split(".")[-1],
        "batch": batch, "seq_len": nsp.L, "torch_device": device, "torch_threads": torch.get_num_threads(),
        **({"note": "the Triton kernel's masked-SDPA stand-in, not the kernel"} if block_sparse and stand_in
           else {}),
    }  # fmt: skip
    finish = lambda step_s: {"ms_per_step": round(step_s * 1e3, 3)}
    return Bench(row, run, lambda: torch_memory(lambda: run(-1), device), finish, warmups=2)


# ---- report ---------------------------------------------------------------------------------------------------------
def train_ratios(results: list[dict]) -> dict:
    """VAR / HMAR ms per step per backend and VAR dense-masked (xla) / HMAR block-sparse (pallas): from the medians,
    and (`_rounds`) the median over shared rounds where both rows were timed in one group; upstream's SDPA / kernel."""
    rows = {(r["model"], r["attn_backend"]): r for r in results if r.get("part") == "train" and "ms_per_step" in r}
    pairs = {f"var_over_hmar_{b}": (("var", b), ("hmar", b)) for b in {b for _, b in rows}}
    pairs["var_xla_over_hmar_pallas"] = (("var", "xla"), ("hmar", "pallas"))
    out = {}
    for name, (num, den) in pairs.items():
        if num in rows and den in rows:
            out[name] = round(rows[num]["ms_per_step"] / rows[den]["ms_per_step"], 3)
            if (by_round := round_ratio(rows[num], rows[den])) is not None:
                out[name + "_rounds"] = by_round
    off = {r["attention"]: r for r in results if r.get("part") == "official_train"}
    sparse = [k for k in off if k.startswith("block_sparse")]
    if "sdpa_mask" in off and sparse:
        out["official_sdpa_over_block_sparse"] = round(
            off["sdpa_mask"]["ms_per_step"] / off[sparse[0]]["ms_per_step"], 3
        )
        if (by_round := round_ratio(off["sdpa_mask"], off[sparse[0]])) is not None:
            out["official_sdpa_over_block_sparse_rounds"] = by_round
    return out


def sample_ratios(results: list[dict]) -> dict:
    """Per dtype and batch: jaxgen / official images/s (by the medians and by shared rounds), HMAR / VAR images/s per
    impl (upstream's claim: HMAR samples faster than VAR with a KV cache), and the official HMAR sampler's memory
    over jaxgen's (GPU: torch max_memory_allocated over XLA's program bytes, both with the weights; CPU: the RSS
    deltas)."""
    rows = {(r["impl"], r["model"], r["dtype"], r["batch"]): r for r in results if "images_per_s" in r}
    out = {}
    for (impl, model, dtype, batch), r in rows.items():
        case = f"{dtype}_b{batch}"
        var = rows.get((impl, "var", dtype, batch))
        if model == "hmar" and var:
            out[f"hmar_over_var_images_per_s_{impl}_{case}"] = round(r["images_per_s"] / var["images_per_s"], 3)
            if (by_round := round_ratio(var, r)) is not None:
                out[f"hmar_over_var_images_per_s_{impl}_{case}_rounds"] = by_round
        theirs = rows.get((OFFICIAL, model, dtype, batch))
        if impl == "jaxgen" and theirs:
            out[f"{model}_jaxgen_over_official_{case}"] = round(r["images_per_s"] / theirs["images_per_s"], 3)
            if (by_round := round_ratio(theirs, r)) is not None:
                out[f"{model}_jaxgen_over_official_{case}_rounds"] = by_round
            mine = r.get("rss_peak_delta_bytes", r.get("xla_program_bytes"))
            other = theirs.get("rss_peak_delta_bytes", theirs.get("torch_max_memory_allocated_bytes"))
            if model == "hmar" and mine and other:
                out[f"memory_official_over_jaxgen_{case}"] = round(other / mine, 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--quick", action="store_true", help="CI smoke: --size=quick, 2 repeats, no VAR reference")
    p.add_argument("--parts", default="sample,train,official_train", help="comma list of sample, train, official_train")
    p.add_argument("--backends", default="pallas,xla", help="attn_backend values of the train rows")
    p.add_argument("--train-models", default="hmar,var,hmar_mask", help=f"comma list of {sorted(TRAIN_MODELS)}")
    p.add_argument("--interleave", type=int, default=0,
                   help="train rows timed together, round by round (default: 4 on a CPU, else 1)")  # fmt: skip
    p.add_argument("--dtype", default="", help="compute dtype (default: the size's: bf16 for d16, else float32)")
    p.add_argument("--train-batch", type=int, default=0, help="default: the size's")
    p.add_argument("--sample-batch", default="", help="comma list (default: the size's)")
    p.add_argument("--schedule", default="released", choices=sorted(SCHEDULES))
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the train rows")
    p.add_argument(
        "--sample-repeats", type=int, default=0, help="timed rounds of the sampling rows (default --repeats)"
    )
    p.add_argument("--no-var-reference", action="store_true", help="skip the VAR sampling rows")
    p.add_argument("--official", default="", help="path to an NVlabs/HMAR checkout (optional)")
    p.add_argument("--official-commit", default="", help="the checkout's commit when it has no .git (an archive)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for torch on a CPU, unless set ('' = OpenMP's default, spinning): on a "
                        "shared 2-core machine spinning OpenMP threads stall torch's ops up to 50x")  # fmt: skip
    p.add_argument("--lower-only", action="store_true",
                   help="trace + lower jaxgen's train steps and samplers on abstract inputs, run nothing (a CPU "
                        "check of the d16 programs); no official rows")  # fmt: skip
    p.add_argument("--note", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.quick:
        args.size, args.repeats, args.no_var_reference = "quick", 2, True
    if args.lower_only:
        args.official = ""
    sz = dict(SIZES[args.size])
    sample_repeats = args.sample_repeats or args.repeats
    dtype = args.dtype or sz["dtype"]
    train_batch = args.train_batch or sz["train_batch"]
    sample_batches = [int(b) for b in args.sample_batch.split(",")] if args.sample_batch else list(sz["sample_batch"])
    interleave = args.interleave or (4 if jax.default_backend() == "cpu" else 1)
    parts = args.parts.split(",")
    tok, gen = models(sz, "hmar")
    patch_nums = tuple(gen.config.patch_nums)
    schedule = schedule_for(patch_nums, args.schedule)
    out = args.out or f"experiments/results/hmar_bench_{jax.default_backend()}.json"
    results: list[dict] = []
    errors: list[dict] = []
    official = None
    load_at_start = round(os.getloadavg()[0], 2)

    def report():
        model = {k: v for k, v in sz.items() if k != "sample_batch"}
        model.update(patch_nums=patch_nums, seq_len=gen.config.seq_len, vocab_size=gen.config.vocab_size, dtype=dtype,
                     image_size=tok.config.image_size)  # fmt: skip
        sampling = {"hmar": {**HMAR_SETTINGS, "refine": True, "mask_schedule_name": args.schedule,
                             "mask_schedule": schedule}, "var": VAR_SETTINGS}  # fmt: skip
        write_report(
            "hmar_bench",
            out,
            results,
            size=args.size,
            quick=args.quick,
            lower_only=args.lower_only,
            parts=parts,
            model=model,
            sampling=sampling,
            train_batch=train_batch,
            sample_batches=sample_batches,
            repeats={"train": args.repeats, "sample": sample_repeats},
            interleave=interleave,
            official=official,
            ratios={"train": train_ratios(results), "sample": sample_ratios(results)},
            targets=TARGETS,
            errors=errors,
            note=args.note,
            load_1m_at_start=load_at_start,
            timing=" ".join(time_rounds.__doc__.split()),
            memory_definitions=" ".join(__doc__.split("Memory: ")[1].split("\n\n")[0].split()),
        )

    def add(row):
        emit(results, row)
        report()

    def fail(what: dict, e: Exception):
        traceback.print_exc()
        keys = ("part", "impl", "model", "what", "attn_backend", "attention", "dtype", "batch")
        errors.append({**{k: what[k] for k in keys if k in what}, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(f"FAILED {what}: {type(e).__name__}: {e}", flush=True)
        report()

    def build(what: dict, fn, *a):
        """fn(*a) (a Bench or a finished row), or None with the error recorded."""
        try:
            return fn(*a)
        except Exception as e:  # a failed row is recorded, the others still run
            fail(what, e)
            return None

    up = None
    if args.official and ({"sample", "official_train"} & set(parts)):
        if args.omp_wait_policy and jax.default_backend() == "cpu":
            os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)  # read when torch loads OpenMP
        try:
            up, shims = import_official(args.official)
            import torch

            torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
            official = {"checkout": args.official, "shims": shims, "torch": torch.__version__,
                        "commit": checkout_commit(args.official) or args.official_commit or None,
                        "torch_threads": torch.get_num_threads(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip
        except Exception as e:  # the jaxgen rows still run
            traceback.print_exc()
            errors.append({"part": "official_import", "error": f"{type(e).__name__}: {e}"})
    group = 0
    # Sampling first: on a GPU, JAX's peak_bytes_in_use cannot be reset and the train steps need far more.
    if "sample" in parts:
        for batch in sample_batches:
            group += 1
            row = {"part": "sample", "dtype": dtype, "batch": batch}
            model_names = ["hmar"] + ([] if args.no_var_reference or args.lower_only else ["var"])
            pair = None
            if up is not None:
                pair = build({**row, "impl": OFFICIAL, "model": "hmar"}, official_hmar, up, sz, dtype)
            benches = []
            for m in model_names:
                benches.append(build({**row, "impl": "jaxgen", "model": m}, sampler_bench, sz, m, schedule, dtype,
                                     batch, args.lower_only))  # fmt: skip
                if pair is not None:
                    benches.append(build({**row, "impl": OFFICIAL, "model": m}, official_sampler_bench, pair, dtype,
                                         batch, schedule, m))  # fmt: skip
            time_rounds([b for b in benches if b is not None], sample_repeats, add, fail, group)
            del pair, benches
    if "train" in parts:
        # the headline pair first (HMAR block-sparse, VAR dense masked), then the rest; `interleave` rows at a time
        combos = [(m, b) for b in args.backends.split(",") for m in args.train_models.split(",")]
        combos.sort(key=lambda mb: (mb != ("hmar", "pallas"), mb != ("var", "xla"), mb[0] == "hmar_mask"))
        for start in range(0, len(combos), interleave):
            group += 1
            benches = [build({"part": "train", "impl": "jaxgen", "model": m, "attn_backend": b, "batch": train_batch},
                             train_bench, sz, m, b, dtype, train_batch, args.lower_only)
                       for m, b in combos[start : start + interleave]]  # fmt: skip
            time_rounds([b for b in benches if b is not None], args.repeats, add, fail, group)
            del benches
    if "official_train" in parts and up is not None:
        group += 1
        benches = [build({"part": "official_train", "attention": "block_sparse" if bs else "sdpa_mask",
                          "batch": train_batch}, official_train_bench, up, sz, bs, train_batch)
                   for bs in (True, False)]  # fmt: skip
        time_rounds([b for b in benches if b is not None], args.repeats, add, fail, group)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
