"""Class-conditional VAR sampling throughput: jaxgen vs the official PyTorch VAR on the same device.

    python experiments/bench_var_sampling.py --config=configs/var_tiny.py --batch=1,32 --dtype=float32 \
        [--official=/path/to/VAR/checkout] [--out=experiments/results/var_sampling_cpu.json]

Random weights (speed does not depend on them), VAR's demo settings (cfg 1.5, top-k 900, top-p 0.96). jaxgen's time
excludes the compile, which is reported separately; each number is the median of --repeats runs after one warm-up.
With --official, the official `VAR.autoregressive_infer_cfg` runs with the same sizes and settings in the same process
(its code is read from that checkout, not from this repo); on GPU under torch.autocast for bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxgen.config_util import load_config
from jaxgen.models.registry import build_var, init_params
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling

SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)


def time_jaxgen(cfg, batch: int, dtype: str, repeats: int) -> dict:
    cfg = cfg.copy_and_resolve_references()
    cfg.vae.dtype = cfg.var.dtype = dtype
    vae, var = build_var(cfg.vae, cfg.var)
    s = vae.config.image_size
    vae_params = init_params(vae, jax.random.key(0), jnp.zeros((1, s, s, 3)))
    var_params = init_params(
        var,
        jax.random.key(1),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, var.config.seq_len - var.config.first_l, var.config.z_channels)),
    )
    sampler = NextScaleSampler(var, vae, NextScaleSampling(**SETTINGS))
    labels = jnp.arange(batch, dtype=jnp.int32) % var.config.num_classes
    t0 = time.perf_counter()
    compiled = sampler.lower(var_params, vae_params, labels, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(var_params, vae_params, labels, jax.random.key(0)).images)  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(var_params, vae_params, labels, jax.random.key(i + 1)).images)
        times.append(time.perf_counter() - t0)
    run_s = statistics.median(times)
    # The tokenizer's decoder alone (f_hat -> image): splits the time between the convnet and the transformer.
    decode = jax.jit(lambda p, f: vae.apply({"params": p}, f, method=MultiScaleVQVAE.fhat_to_img))
    pn = vae.config.patch_nums[-1]
    f_hat = jnp.zeros((batch, pn, pn, vae.config.z_channels))
    return {
        "impl": "jaxgen",
        "dtype": dtype,
        "batch": batch,
        "compile_s": round(compile_s, 3),
        "run_s": round(run_s, 5),
        "images_per_s": round(batch / run_s, 3),
        "decode_s": round(_median_time(lambda: jax.block_until_ready(decode(vae_params, f_hat)), repeats), 5),
        "runs": len(times),
    }


def _median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_official(checkout: str, cfg, batch: int, dtype: str, repeats: int) -> dict:
    """The official VAR, built from the same sizes; its source is imported from `checkout`."""
    import torch

    sys.path.insert(0, str(Path(checkout).absolute()))
    from models.var import VAR
    from models.vqvae import VQVAE

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    v, t = cfg.vae, cfg.var
    vae = VQVAE(
        vocab_size=v.vocab_size,
        z_channels=v.z_channels,
        ch=v.ch,
        test_mode=True,
        share_quant_resi=v.share_quant_resi,
        v_patch_nums=tuple(v.patch_nums),
    ).to(device)
    model = (
        VAR(
            vae,
            num_classes=t.num_classes,
            depth=t.depth,
            embed_dim=t.embed_dim,
            num_heads=t.num_heads,
            mlp_ratio=t.mlp_ratio,
            norm_eps=t.norm_eps,
            shared_aln=t.shared_aln,
            cond_drop_rate=0.0,
            attn_l2_norm=t.attn_l2_norm,
            patch_nums=tuple(v.patch_nums),
            flash_if_available=True,
            fused_if_available=True,
        )
        .to(device)
        .eval()
    )
    model.init_weights()
    labels = torch.arange(batch, device=device) % t.num_classes
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run(seed):
        with torch.inference_mode(), amp:
            img = model.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed, **SETTINGS)
        if device == "cuda":
            torch.cuda.synchronize()
        return img

    run(0)  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - t0)
    run_s = statistics.median(times)
    f_hat = torch.zeros(batch, v.z_channels, v.patch_nums[-1], v.patch_nums[-1], device=device)

    def decode():
        with torch.inference_mode(), amp:
            vae.fhat_to_img(f_hat)
        if device == "cuda":
            torch.cuda.synchronize()

    return {
        "impl": "official_pytorch",
        "dtype": dtype,
        "batch": batch,
        "run_s": round(run_s, 5),
        "images_per_s": round(batch / run_s, 3),
        "decode_s": round(_median_time(decode, repeats), 5),
        "runs": len(times),
        "torch": torch.__version__,
        "torch_device": device,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/var_tiny.py")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--official", default="", help="path to a FoundationVision/VAR checkout (optional)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    cfg = load_config(args.config)
    dev = jax.devices()[0]
    results = []
    for dtype in args.dtype.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            results.append(time_jaxgen(cfg, batch, dtype, args.repeats))
            print(json.dumps(results[-1]), flush=True)
            if args.official:
                results.append(time_official(args.official, cfg, batch, dtype, args.repeats))
                print(json.dumps(results[-1]), flush=True)
    ratios = {}
    for r in results:
        if r["impl"] == "official_pytorch":
            ours = next(
                x for x in results if x["impl"] == "jaxgen" and x["batch"] == r["batch"] and x["dtype"] == r["dtype"]
            )
            ratios[f"{r['dtype']}_b{r['batch']}"] = round(ours["images_per_s"] / r["images_per_s"], 3)
    report = {
        "benchmark": "var_sampling",
        "config": args.config,
        "settings": SETTINGS,
        "device": {
            "platform": dev.platform,
            "kind": dev.device_kind,
            "count": jax.device_count(),
            "host": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "jax": jax.__version__,
        "command": " ".join(sys.argv),
        "results": results,
        "speedup_jaxgen_over_official": ratios,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out or f"experiments/results/var_sampling_{dev.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
