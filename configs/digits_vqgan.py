"""A VQGAN tokenizer (LlamaGen's VQ architecture: L2-normalised codebook) trained with the full tokenizer
objective on the embedded digits.

    python -m jaxgen.main --config=configs/digits_vqgan.py --workdir=workdir/digits_vqgan
    python -m jaxgen.main --config=configs/digits_vqgan.py:smoke --workdir=/tmp/digits_vqgan_smoke

4x4 = 16 tokens per image. L1 + codebook/commitment + entropy loss + a PatchGAN (hinge, adaptive weight) from step
`disc_start`; LPIPS is off by default (set tokenizer_loss.perceptual_weight=1.0 once the weight file exists, see
docs/lpips.md). metrics.jsonl carries psnr, codebook_usage and perplexity; the report adds SSIM (and LPIPS when the
weight file exists) on the held-out digits.
"""

import ml_collections

from jaxgen.train.sections import (
    digits_data_section,
    make_smoke,
    parallel_section,
    tokenizer_loss_section,
    train_section,
    unknown_variant,
)

VARIANTS = ("", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.stages = ("tokenizer",)
    cfg.tokenizer_checkpoint = ""
    cfg.data = digits_data_section()
    cfg.vq = dict(
        codebook_size=256,
        codebook_embed_dim=8,
        z_channels=32,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        l2_norm=True,
        beta=0.25,
        ema_decay=0.0,  # > 0: EMA codebook updates instead of the codebook loss
        dead_code_threshold=0.0,  # > 0 (with ema_decay): restart codes whose EMA usage falls below this
    )
    cfg.tokenizer_loss = tokenizer_loss_section(
        rec_loss="l1",
        perceptual_weight=0.0,
        entropy_weight=0.01,
        entropy_temperature=0.01,
        disc_weight=0.1,
        disc_start=400,
        disc_layers=2,  # 16 px: two stride-2 layers leave 2x2 patch logits
        disc_ndf=32,
        usage_window=50,
    )
    cfg.train_tokenizer = train_section(steps=800, lr=2e-3, b1=0.5, b2=0.9, sample_every=400)
    cfg.parallel = parallel_section()
    if arg == "smoke":
        make_smoke(cfg)
        cfg.tokenizer_loss.disc_start = 5  # the adversarial terms run in the smoke test too
    elif arg:
        raise unknown_variant("configs/digits_vqgan.py", arg, VARIANTS)
    return cfg
