"""A small VAR with ImageNet's vocabulary and classes (128 px, 7 scales, depth 4, width 256) for CPU benchmarks:
the demo sampling settings (top-k 900 of 4096) apply unchanged, and a batch of 32 samples in seconds on 2 cores."""

import ml_collections

from jaxgen.train.sections import unknown_variant

VARIANTS = ("",)  # no named variants: --config=configs/var_small.py


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise unknown_variant("configs/var_small.py", arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.family = "var"
    cfg.seed = 0
    cfg.vae = dict(
        vocab_size=4096,
        z_channels=32,
        ch=32,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        patch_nums=(1, 2, 3, 4, 5, 6, 8),
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
        embed_dim=256,
        num_heads=4,
        num_classes=1000,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=False,
        attn_l2_norm=True,
        cond_drop_rate=0.1,
        drop_path_rate=0.0,
    )
    cfg.sampling = dict(cfg=1.5, top_k=900, top_p=0.96, temperature=1.0, more_smooth=False)
    cfg.grid = dict(classes=(207, 360, 387, 974), per_class=4)
    cfg.checkpoint = ""
    return cfg
