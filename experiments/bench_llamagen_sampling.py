"""Class-conditional LlamaGen sampling throughput: jaxgen vs the official PyTorch LlamaGen on the same device.

    python experiments/bench_llamagen_sampling.py --config=configs/llamagen_small.py --batch=1,64 \
        [--dtype=float32,bfloat16] [--settings=fid|demo] [--official=/path/to/LlamaGen/checkout] [--out=...json]

Random weights (speed does not depend on them). Settings: `fid` (default) is LlamaGen's FID sampling (cfg_scale 2.0,
CFG on at every step, top-k off, top-p off, temperature 1.0); `demo` is its demo script's (cfg_scale 4.0, top-k 2000).
A sample is the whole pipeline: class token -> block_size image tokens (CFG doubles the GPT batch) -> VQ decoder ->
image. jaxgen's time excludes the compile, which is reported separately; each time is the median of --repeats runs
after one warm-up. `decode_s` is the tokenizer's decoder alone (tokens -> image) for the same batch, so
run_s - decode_s is the GPT decode loop with its sampling.

With --official, LlamaGen's `generate(...)` + `VQModel.decode_code(...)` run with the same sizes and settings in the
same process; their code is imported from that checkout (none of it is in this repo). `--dtype=bfloat16` sets
jaxgen's gpt.dtype and vq.dtype (bf16 compute, float32 params); on the official side it casts the GPT to bf16 as
upstream's sample_c2i.py does (--precision bf16; its KV cache follows the weights' dtype) and runs everything under
torch.autocast(bf16), which is what puts the VQ decoder in bf16. Upstream's optional torch.compile is not used.
With --official, JAX's GPU memory preallocation is capped at 45% (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) so
that torch has room in the same process.

`--lower-only` lowers jaxgen's sampler on abstract params (no jaxgen params allocated, nothing run) and, with
--official, builds the official models on CPU: a quick check that a full-size config (configs/llamagen_imagenet.py:B
or :L) is accepted by both sides.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import OFFICIAL, compile_timed, emit, median_time, torch_sync, write_report

from jaxgen.config_util import load_config
from jaxgen.convert.common import count_params
from jaxgen.families import FAMILIES, init_family_params, param_shapes
from jaxgen.families.llamagen import build as build_llamagen
from jaxgen.models.tokenizers.vqgan import VQGAN
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling

SETTINGS = {
    # autoregressive/sample/sample_c2i_ddp.py as used for FID (cfg_scale 2.0 for GPT-B and GPT-L).
    "fid": dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0),
    # autoregressive/sample/sample_c2i.py's defaults.
    "demo": dict(cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=2000, top_p=1.0),
}


def build(cfg, dtype: str):
    """(vq, gpt) jaxgen modules with compute dtype `dtype`."""
    cfg = cfg.copy_and_resolve_references()
    cfg.vq.dtype = cfg.gpt.dtype = dtype
    return build_llamagen(cfg.vq, cfg.gpt)


def _rates(batch: int, tokens: int, run_s: float, decode_s: float) -> dict:
    return {
        "run_s": round(run_s, 5),
        "images_per_s": round(batch / run_s, 3),
        "tokens_per_s": round(batch * tokens / run_s, 1),
        "decode_s": round(decode_s, 5),
        # The GPT loop alone (CFG doubles its batch; these are generated image tokens).
        "gpt_tokens_per_s": round(batch * tokens / max(run_s - decode_s, 1e-9), 1),
    }


def time_jaxgen(cfg, batch: int, dtype: str, settings: dict, repeats: int) -> dict:
    vq, gpt = build(cfg, dtype)
    params = init_family_params(FAMILIES["llamagen"], vq, gpt, cfg.seed)
    gp, vp = params["gpt"], params["vq"]
    sampler = NextTokenSampler(gpt, vq, NextTokenSampling(**settings))
    labels = jnp.arange(batch, dtype=jnp.int32) % gpt.config.num_classes
    compiled, compile_s = compile_timed(sampler.lower(gp, vp, labels, jax.random.key(0)))
    run_s, times = median_time(
        lambda i: jax.block_until_ready(compiled(gp, vp, labels, jax.random.key(i)).images), repeats
    )
    n, grid = gpt.config.block_size, gpt.config.grid_size
    decode = jax.jit(lambda p, t: vq.apply({"params": p}, t, (grid, grid), method=VQGAN.decode_code))
    tokens = jnp.zeros((batch, n), jnp.int32)
    decode_s, _ = median_time(lambda _: jax.block_until_ready(decode(vp, tokens)), repeats)
    return {
        "impl": "jaxgen",
        "dtype": dtype,
        "batch": batch,
        "tokens": n,
        "compile_s": round(compile_s, 3),
        **_rates(batch, n, run_s, decode_s),
        "runs": len(times),
    }


def _import_official(checkout: str):
    path = str(Path(checkout).absolute())
    if path not in sys.path:
        sys.path.insert(0, path)  # upstream imports itself as `autoregressive.*`, `tokenizer.*`, `utils.*`
    from autoregressive.models import generate, gpt
    from tokenizer.tokenizer_image import vq_model

    return gpt, generate, vq_model


def build_official(checkout: str, cfg, dtype: str, device: str):
    """The official Transformer and VQModel with the sizes of jaxgen's configs, random weights, eval mode."""
    import torch

    gpt_mod, _, vq_mod = _import_official(checkout)
    vq_j, gpt_j = build(cfg, dtype)
    g, v = gpt_j.config, vq_j.config
    args = gpt_mod.ModelArgs(
        dim=g.dim,
        n_layer=g.n_layer,
        n_head=g.n_head,
        n_kv_head=g.n_kv_head,
        multiple_of=g.multiple_of,
        ffn_dim_multiplier=g.ffn_dim_multiplier,
        rope_base=g.rope_base,
        norm_eps=g.norm_eps,
        token_dropout_p=0.0,
        attn_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
        drop_path_rate=0.0,
        num_classes=g.num_classes,
        class_dropout_prob=g.class_dropout_prob,
        model_type="c2i",
        vocab_size=g.vocab_size,
        cls_token_num=g.cls_token_num,
        block_size=g.block_size,
    )
    gpt_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = gpt_mod.Transformer(args).to(device=device, dtype=gpt_dtype).eval()
    vq = vq_mod.VQModel(
        vq_mod.ModelArgs(
            codebook_size=v.codebook_size,
            codebook_embed_dim=v.codebook_embed_dim,
            codebook_l2_norm=v.l2_norm,
            encoder_ch_mult=list(v.ch_mult),
            decoder_ch_mult=list(v.decoder_ch_mult),
            z_channels=v.z_channels,
        )
    )
    # VQModel does not pass `ch` / `num_res_blocks` on (it always builds ch=128, 2): set its encoder and decoder
    # from upstream's own classes with our sizes (the state_dict names stay upstream's).
    vq.encoder = vq_mod.Encoder(ch=v.ch, ch_mult=v.ch_mult, num_res_blocks=v.num_res_blocks, z_channels=v.z_channels)
    vq.decoder = vq_mod.Decoder(
        z_channels=v.z_channels, ch=v.ch, ch_mult=v.decoder_ch_mult, num_res_blocks=v.num_res_blocks
    )
    return model, vq.to(device).eval()


def time_official(checkout: str, cfg, batch: int, dtype: str, settings: dict, repeats: int) -> dict:
    import torch

    _, gen_mod, _ = _import_official(checkout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model, vq = build_official(checkout, cfg, dtype, device)
    n, grid = model.block_size, int(model.block_size**0.5)
    labels = torch.arange(batch, device=device) % model.num_classes
    qzshape = [batch, vq.config.codebook_embed_dim, grid, grid]
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run(seed):
        torch.manual_seed(seed)
        with torch.inference_mode(), amp:
            idx = gen_mod.generate(model, labels, n, sample_logits=True, **settings)
            vq.decode_code(idx, qzshape)
        torch_sync(device)

    run_s, times = median_time(run, repeats)
    tokens = torch.zeros(batch, n, dtype=torch.long, device=device)

    def decode(_):
        with torch.inference_mode(), amp:
            vq.decode_code(tokens, qzshape)
        torch_sync(device)

    decode_s, _ = median_time(decode, repeats)
    return {
        "impl": OFFICIAL,
        "dtype": dtype,
        "batch": batch,
        "tokens": n,
        **_rates(batch, n, run_s, decode_s),
        "runs": len(times),
        "torch": torch.__version__,
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
    }


def lower_only(cfg, dtype: str, settings: dict, batches: list[int], checkout: str) -> dict:
    """Build both sides and lower jaxgen's sampler on abstract params: the argument check for full-size configs."""
    vq, gpt = build(cfg, dtype)
    shapes = param_shapes(FAMILIES["llamagen"], vq, gpt)
    sampler = NextTokenSampler(gpt, vq, NextTokenSampling(**settings))
    key = jax.eval_shape(lambda: jax.random.key(0))
    for b in batches:
        sampler.lower(shapes["gpt"], shapes["vq"], jnp.zeros((b,), jnp.int32), key)
    out = {"jaxgen_params": {k: count_params(v) for k, v in shapes.items()}, "lowered_batches": batches}
    if checkout:
        model, vq_t = build_official(checkout, cfg, dtype, "cpu")  # upstream's init calls .item(): no meta device
        out["official_params"] = {
            "vq": sum(p.numel() for p in vq_t.parameters()),
            "gpt": sum(p.numel() for p in model.parameters()),
        }
    return out


def _checkout_commit(checkout: str) -> str | None:
    if not (Path(checkout) / ".git").exists():
        return None
    try:
        return subprocess.run(
            ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llamagen_small.py")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16")
    p.add_argument("--settings", default="fid", choices=sorted(SETTINGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--official", default="", help="path to a FoundationVision/LlamaGen checkout (optional)")
    p.add_argument("--official-commit", default="", help="recorded in the JSON when the checkout has no .git")
    p.add_argument("--lower-only", action="store_true", help="build and lower only (no params, no run)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.official:
        # On a GPU, JAX would otherwise take 75% of its memory at first use and leave torch the rest.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    cfg = load_config(args.config)
    settings = SETTINGS[args.settings]
    batches = [int(b) for b in args.batch.split(",")]
    dtypes = args.dtype.split(",")
    if bad := sorted(set(dtypes) - {"float32", "bfloat16"}):
        p.error(f"--dtype: unknown {bad}; use float32 and/or bfloat16")
    if args.lower_only:
        for dtype in dtypes:
            print(dtype, lower_only(cfg, dtype, settings, batches, args.official), flush=True)
        return 0
    results = []
    for dtype in dtypes:
        for batch in batches:
            emit(results, time_jaxgen(cfg, batch, dtype, settings, args.repeats))
            if args.official:
                emit(results, time_official(args.official, cfg, batch, dtype, settings, args.repeats))
    vq, gpt = build(cfg, "float32")
    out = args.out or f"experiments/results/llamagen_sampling_{jax.default_backend()}.json"
    write_report(
        "llamagen_sampling",
        out,
        results,
        config=args.config,
        settings={"name": args.settings, **settings},
        model={
            "gpt": {k: getattr(gpt.config, k) for k in ("dim", "n_layer", "n_head", "ffn_hidden", "block_size")},
            "vq": {k: getattr(vq.config, k) for k in ("ch", "ch_mult", "z_channels", "num_res_blocks")},
            "vocab": gpt.config.vocab_size,
            "num_classes": gpt.config.num_classes,
            "image_size": gpt.config.grid_size * vq.config.downsample,
        },
        official=(
            {"checkout": args.official, "commit": args.official_commit or _checkout_commit(args.official)}
            if args.official
            else None
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
