"""The main job: VAR on the embedded scikit-learn digits (16 px RGB, 10 classes), on a laptop CPU.

    python -m jaxgen.main --config=configs/digits_var.py --workdir=workdir/digits_var          # < 15 min, 2 cores
    python -m jaxgen.main --config=configs/digits_var.py:smoke --workdir=/tmp/digits_var_smoke  # < 2 min

Stage 1 trains VAR's multi-scale VQVAE (scales 1-2-3-4 on a 4x4 latent: 30 tokens per image), stage 2 the
next-scale transformer on the token ids it writes, with the digits FID of its samples every 500 steps
(metrics.jsonl, TensorBoard `generator_eval/digits_fid`); the report scores class-conditional samples with a
classifier fit on real held-out digits and gives their digits FID beside the real-data floor.
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
    cfg.family = "var"
    cfg.seed = 0
    cfg.stages = ("tokenizer", "generator")
    cfg.tokenizer_checkpoint = ""  # used when stages has no "tokenizer"
    cfg.checkpoint = ""  # jaxgen.sample: a converted checkpoint, or this run's workdir (its generator/export)
    cfg.data = digits_data_section()
    cfg.vae = dict(
        vocab_size=256,
        z_channels=16,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        patch_nums=(1, 2, 3, 4),
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        using_znorm=False,
        beta=0.25,
    )
    cfg.var = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=False,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        depth=4,
        embed_dim=128,
        num_heads=4,
        num_classes=10,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=False,
        attn_l2_norm=True,
        cond_drop_rate=0.1,
        drop_path_rate=0.0,
    )
    cfg.tokenizer_loss = tokenizer_loss_section(rec_loss="l1")
    cfg.train_tokenizer = train_section(steps=600, lr=2e-3, sample_every=300)
    cfg.train_generator = train_section(steps=1500, lr=1e-3, weight_decay=0.05, sample_every=500)
    cfg.parallel = parallel_section()
    cfg.sampling = dict(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, more_smooth=False)
    cfg.grid = dict(classes=tuple(range(10)), per_class=8)
    cfg.eval = digits_eval_section()  # report: class fidelity + digits FID; digits FID every 500 steps
    if arg == "smoke":
        make_smoke(cfg)
    elif arg:
        raise unknown_variant("configs/digits_var.py", arg, VARIANTS)
    return cfg
