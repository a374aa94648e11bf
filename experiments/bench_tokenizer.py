"""Tokenizer training and coding speed: LlamaGen's VQ-16 and VAR's multi-scale VQVAE at 256 px, jaxgen beside the
official PyTorch models.

    python experiments/bench_tokenizer.py --models=vq16,var_vqvae --dtype=bfloat16,float32 --batch=16 \
        --official=.upstream --out=experiments/results/tokenizer_h100.json        # on a GPU
    python experiments/bench_tokenizer.py --batch=1 --repeats=2 --out=experiments/results/tokenizer_cpu.json

Per model and dtype:
- `train` rows: one optimizer step of the tokenizer objective through jaxgen's real train step (`make_train_step`
  with `tokenizer_task`), as steps/s and images/s. `losses=l1_vq` is reconstruction + codebook/commitment (what the
  official models' own `forward` returns, so the PyTorch row runs the same objective: L1 + their VQ loss, backward,
  Adam); `losses=full` adds LPIPS (VGG16 + heads, random weights: same FLOPs as the real ones) and the PatchGAN with
  VQGAN's adaptive weight, active from step 0 (jaxgen only: VAR never released its tokenizer trainer, and LlamaGen's
  loss needs torchvision's VGG).
- `encode` / `decode` rows: images/s of image -> token ids and token ids -> image.
Times are medians of --repeats runs after one warm-up; `compile_s` is jaxgen's compile time of that function.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from timing import OFFICIAL, emit, median_time, torch_sync, write_report

from jaxgen.models.lpips import lpips_param_shapes
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.train.generator_task import encode_fn
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step
from jaxgen.train.tokenizer_task import TokenizerLossConfig, tokenizer_task

LOSSES = {
    "l1_vq": TokenizerLossConfig(rec_loss="l1"),
    "full": TokenizerLossConfig(rec_loss="l1", perceptual_weight=1.0, disc_weight=0.5, disc_start=0),
}


def build(name: str, dtype: str):
    """(training tokenizer, image size) for a model name; the released models' sizes."""
    if name == "vq16":
        return VQGAN(VQConfig(dtype=dtype)), 256
    if name == "var_vqvae":
        return MultiScaleVQVAE(MSVQConfig(dtype=dtype)), 256
    raise ValueError(f"--models: unknown model {name!r}; use vq16, var_vqvae")


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def time_jaxgen_train(name: str, dtype: str, losses: str, batch: int, repeats: int) -> dict:
    tok, size = build(name, dtype)
    loss_cfg = LOSSES[losses]
    frozen = None
    if loss_cfg.perceptual_weight > 0:
        key = jax.random.key(3)
        frozen = {
            "lpips": jax.tree.map(lambda s: 0.02 * jax.random.normal(key, s.shape, s.dtype), lpips_param_shapes())
        }
    task = tokenizer_task(tok, loss_cfg, image_size=size, frozen=frozen)
    tc = ml_collections.ConfigDict(train_section(steps=1000, lr=1e-4, compute_dtype=dtype))
    tx = task.optimizer(tc)
    params, model_state = jax.jit(task.init)(jax.random.key(0))
    state = create_state(params, tx, jax.random.key_data(jax.random.key(1)), model_state)
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.999), donate_argnums=0)
    batch_in = {"image": jnp.asarray(_images(batch, size))}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_in, frozen).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run(_):
        holder[0], m = compiled(holder[0], batch_in, frozen)
        jax.block_until_ready(m["loss"])

    step_s, _ = median_time(run, repeats)
    return {"compile_s": round(compile_s, 1), "step_s": round(step_s, 4)}


def time_jaxgen_coding(name: str, dtype: str, batch: int, repeats: int) -> tuple[dict, dict]:
    tok, size = build(name, dtype)
    params = jax.jit(lambda k: tok.init(k, jnp.zeros((1, size, size, 3)))["params"])(jax.random.key(0))
    images = jnp.asarray(_images(batch, size))
    encode = encode_fn(tok, params)
    ids = encode(images)
    if isinstance(tok, MultiScaleVQVAE):
        ends = np.cumsum([p * p for p in tok.config.patch_nums])
        split = lambda t: [t[:, e - p * p : e] for p, e in zip(tok.config.patch_nums, ends, strict=True)]
        decode = jax.jit(lambda p, t: tok.apply({"params": p}, split(t), method=MultiScaleVQVAE.indices_to_img))
    else:
        decode = jax.jit(lambda p, t: tok.apply({"params": p}, t, method="decode_ids"))
    ids = jnp.asarray(ids)
    t0 = time.perf_counter()
    jax.block_until_ready(decode(params, ids))
    dec_compile = time.perf_counter() - t0
    enc_s, _ = median_time(lambda _: encode(np.asarray(images)), repeats)
    dec_s, _ = median_time(lambda _: jax.block_until_ready(decode(params, ids)), repeats)
    return {"step_s": round(enc_s, 4)}, {"step_s": round(dec_s, 4), "compile_s": round(dec_compile, 1)}


# ---- the official PyTorch models ---------------------------------------------------------------------------------


def _official_model(name: str, checkout: Path, device: str):
    import torch  # noqa: F401

    if name == "vq16":
        sys.path.insert(0, str(checkout / "LlamaGen"))
        from tokenizer.tokenizer_image.vq_model import VQ_16

        model = VQ_16().to(device)
        # Upstream keeps its usage counter as a Parameter inside a buffer and updates it in place, which autograd
        # refuses outside no_grad; it is bookkeeping, not a weight.
        model.quantize.codebook_used.requires_grad_(False)
        return model
    sys.path.insert(0, str(checkout / "VAR"))
    from models.vqvae import VQVAE

    return VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=False, share_quant_resi=4).to(device)


def time_official(name: str, dtype: str, batch: int, repeats: int, checkout: Path) -> dict[str, dict]:
    """Train step (L1 + the model's own VQ loss, backward, Adam), encode and decode of the official model."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    if not torch.distributed.is_initialized():  # VAR's quantizer reads the world size in training mode
        init_file = Path(tempfile.mkdtemp()) / "pg"
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    model = _official_model(name, checkout, device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.from_numpy(_images(batch, 256)).permute(0, 3, 1, 2).contiguous().to(device)
    amp = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def train(_):
        with amp():
            if name == "vq16":
                rec, (vq_loss, commit, entropy, _) = model(x)
                loss = (rec - x).abs().mean() + vq_loss + commit + entropy
            else:
                rec, _, vq_loss = model(x)
                loss = (rec - x).abs().mean() + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch_sync(device)

    out = {"train": {"step_s": round(median_time(train, repeats)[0], 4)}}
    model.eval()
    with torch.inference_mode(), amp():
        if name == "vq16":
            ids = model.encode(x)[2][2]
            shape = (batch, model.config.codebook_embed_dim, 16, 16)
            encode = lambda: model.encode(x)[2][2]
            decode = lambda: model.decode_code(ids, shape)
        else:
            ids = model.img_to_idxBl(x)
            encode = lambda: model.img_to_idxBl(x)
            decode = lambda: model.idxBl_to_img(ids, same_shape=False, last_one=True)

    def timed(fn):
        def run(_):
            with torch.inference_mode(), amp():
                fn()
            torch_sync(device)

        return {"step_s": round(median_time(run, repeats)[0], 4)}

    out["encode"], out["decode"] = timed(encode), timed(decode)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vq16,var_vqvae")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--losses", default="l1_vq,full")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--official", default="", help="folder with the official VAR/ and LlamaGen/ checkouts")
    p.add_argument("--out", default="experiments/results/tokenizer_bench.json")
    args = p.parse_args()
    rows: list[dict] = []
    b = args.batch
    for name in args.models.split(","):
        for dtype in args.dtype.split(","):
            base = {"model": name, "dtype": dtype, "batch": b, "image_size": 256}
            for losses in args.losses.split(","):
                r = time_jaxgen_train(name, dtype, losses, b, args.repeats)
                rates = {"steps_per_s": round(1 / r["step_s"], 3), "images_per_s": round(b / r["step_s"], 4)}
                emit(rows, base | {"impl": "jaxgen", "what": "train", "losses": losses, **r, **rates})
            enc, dec = time_jaxgen_coding(name, dtype, b, args.repeats)
            for what, r in (("encode", enc), ("decode", dec)):
                emit(rows, base | {"impl": "jaxgen", "what": what, **r, "images_per_s": round(b / r["step_s"], 4)})
            if args.official:
                for what, r in time_official(name, dtype, b, args.repeats, Path(args.official)).items():
                    extra = {"losses": "l1_vq"} if what == "train" else {}
                    rate = {"images_per_s": round(b / r["step_s"], 4)}
                    emit(rows, base | {"impl": OFFICIAL, "what": what, **extra, **r, **rate})
    write_report("tokenizer", args.out, rows, args=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
