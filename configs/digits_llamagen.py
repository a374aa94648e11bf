"""LlamaGen (next-token) on the embedded scikit-learn digits (16 px RGB, 10 classes), through the same loop as
configs/digits_var.py: a VQ tokenizer (4x4 = 16 tokens per image) and then a class-conditional GPT with 2D RoPE.

    python -m jaxgen.main --config=configs/digits_llamagen.py --workdir=workdir/digits_llamagen
    python -m jaxgen.main --config=configs/digits_llamagen.py:smoke --workdir=/tmp/digits_llamagen_smoke
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
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.stages = ("tokenizer", "generator")
    cfg.tokenizer_checkpoint = ""
    cfg.checkpoint = ""  # jaxgen.sample: a converted checkpoint, or this run's workdir (its generator/export)
    cfg.data = digits_data_section()
    cfg.vq = dict(codebook_size=256, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    cfg.gpt = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=False,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        num_classes=10,
        dim=128,
        n_layer=4,
        n_head=4,
        block_size=16,
        class_dropout_prob=0.1,
    )
    cfg.tokenizer_loss = tokenizer_loss_section(rec_loss="l1")
    cfg.train_tokenizer = train_section(steps=600, lr=2e-3, sample_every=300)
    cfg.train_generator = train_section(steps=1500, lr=1e-3, weight_decay=0.05)
    cfg.parallel = parallel_section()
    cfg.sampling = dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=tuple(range(10)), per_class=8)
    cfg.eval = digits_eval_section()  # report: class fidelity + digits FID; digits FID every 500 steps
    if arg == "smoke":
        make_smoke(cfg)
    elif arg:
        raise unknown_variant("configs/digits_llamagen.py", arg, VARIANTS)
    return cfg
