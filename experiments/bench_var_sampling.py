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
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import compile_timed, emit, median_time, torch_sync, write_report

from jaxgen.config_util import load_config
from jaxgen.families.var import build as build_var
from jaxgen.models.registry import init_params
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
    compiled, compile_s = compile_timed(sampler.lower(var_params, vae_params, labels, jax.random.key(0)))
    run_s, times = median_time(
        lambda i: jax.block_until_ready(compiled(var_params, vae_params, labels, jax.random.key(i)).images), repeats
    )
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
        "decode_s": round(median_time(lambda _: jax.block_until_ready(decode(vae_params, f_hat)), repeats)[0], 5),
        "runs": len(times),
    }


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
            model.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed, **SETTINGS)
        torch_sync(device)

    run_s, times = median_time(run, repeats)
    f_hat = torch.zeros(batch, v.z_channels, v.patch_nums[-1], v.patch_nums[-1], device=device)

    def decode(_):
        with torch.inference_mode(), amp:
            vae.fhat_to_img(f_hat)
        torch_sync(device)

    return {
        "impl": "official_pytorch",
        "dtype": dtype,
        "batch": batch,
        "run_s": round(run_s, 5),
        "images_per_s": round(batch / run_s, 3),
        "decode_s": round(median_time(decode, repeats)[0], 5),
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
    results = []
    for dtype in args.dtype.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            emit(results, time_jaxgen(cfg, batch, dtype, args.repeats))
            if args.official:
                emit(results, time_official(args.official, cfg, batch, dtype, args.repeats))
    out = args.out or f"experiments/results/var_sampling_{jax.default_backend()}.json"
    write_report("var_sampling", out, results, config=args.config, settings=SETTINGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
