"""VAR on ImageNet, the released models: `--config=configs/var_imagenet.py:d16` (d16, d20, d24, d30: 256 px;
d36: 512 px with shared AdaLN). Sizes follow the official builder: width 64*depth, heads = depth,
drop-path 0.1*depth/24, one VQVAE (vae_ch160v4096z32) for all."""

import ml_collections

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def get_config(arg: str = "d16") -> ml_collections.ConfigDict:
    if arg not in ("d16", "d20", "d24", "d30", "d36"):
        raise ValueError(f"unknown variant {arg!r}: choose d16, d20, d24, d30 or d36")
    depth = int(arg[1:])
    patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
    cfg = ml_collections.ConfigDict()
    cfg.family = "var"
    cfg.seed = 0
    cfg.vae = dict(
        vocab_size=4096,
        z_channels=32,
        ch=160,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        patch_nums=patch_nums,
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        using_znorm=False,
        beta=0.25,
    )
    cfg.var = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        num_classes=1000,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=depth == 36,
        attn_l2_norm=True,
        cond_drop_rate=0.1,
        drop_path_rate=0.1 * depth / 24,
    )
    cfg.sampling = dict(cfg=1.5, top_k=900, top_p=0.96, temperature=1.0, more_smooth=False)
    cfg.grid = dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4)
    cfg.checkpoint = ""  # a directory written by `python -m jaxgen.convert var ...`
    return cfg
