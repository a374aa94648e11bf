"""A TiTok-style 1D tokenizer (ViT over 4x4 patches + K learned latent tokens) on the embedded digits, then a
class-conditional GPT over its K token ids: the same next-token generator as LlamaGen, on `[B, K]` tokens.

    python -m jaxgen.main --config=configs/digits_titok.py --workdir=workdir/digits_titok
    python -m jaxgen.main --config=configs/digits_titok.py:smoke --workdir=/tmp/digits_titok_smoke
    python -m jaxgen.main --config=configs/digits_titok.py --config.titok.num_latent_tokens=64 ...  # K: 32..256

L1 + codebook/commitment + entropy loss (+ a PatchGAN when tokenizer_loss.disc_weight > 0; LPIPS when
perceptual_weight > 0 and its weight file exists, see docs/lpips.md). metrics.jsonl carries psnr, codebook_usage and
perplexity; the report adds SSIM on the held-out digits and the class fidelity of the GPT's samples.
"""

import ml_collections

from jaxgen.train.sections import (
    digits_data_section,
    digits_eval_section,
    make_smoke,
    parallel_section,
    tokenizer_loss_section,
    train_section,
    unknown_variant,
)

VARIANTS = ("", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.family = "titok"
    cfg.seed = 0
    cfg.stages = ("tokenizer", "generator")
    cfg.tokenizer_checkpoint = ""
    cfg.checkpoint = ""  # jaxgen.sample: a converted checkpoint, or this run's workdir (its generator/export)
    cfg.data = digits_data_section()
    cfg.titok = dict(
        image_size=16,
        patch_size=4,
        num_latent_tokens=32,  # K
        width=128,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        codebook_size=256,
        codebook_embed_dim=16,
        l2_norm=True,
        beta=0.25,
        ema_decay=0.0,
        dead_code_threshold=0.0,
    )
    cfg.gpt = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=False,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        num_classes=10,
        dim=128,
        n_layer=4,
        n_head=4,
        class_dropout_prob=0.1,
    )  # block_size = K
    cfg.tokenizer_loss = tokenizer_loss_section(
        rec_loss="l1",
        entropy_weight=0.01,
        entropy_temperature=0.01,
        usage_window=50,
    )
    cfg.train_tokenizer = train_section(steps=1000, lr=1e-3, warmup_steps=100, sample_every=500)
    cfg.train_generator = train_section(steps=1500, lr=1e-3, weight_decay=0.05)
    cfg.parallel = parallel_section()
    cfg.sampling = dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=tuple(range(10)), per_class=8)
    cfg.eval = digits_eval_section()  # report: class fidelity + digits FID; digits FID every 500 steps
    if arg == "smoke":
        make_smoke(cfg)
    elif arg:
        raise unknown_variant("configs/digits_titok.py", arg, VARIANTS)
    return cfg
