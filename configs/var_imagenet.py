"""VAR on ImageNet, the released models: `--config=configs/var_imagenet.py:d16` (d16, d20, d24, d30: 256 px;
d36: 512 px with shared AdaLN). Sizes follow the official builder: width 64*depth, heads = depth,
drop-path 0.1*depth/24, one VQVAE (vae_ch160v4096z32) for all.

Training trains the transformer on a converted (or jaxgen-trained) VQVAE, as upstream does:

    python -m jaxgen.convert var --vae vae_ch160v4096z32.pth --var var_d16.pth --out ckpt/var_d16
    python -m jaxgen.main --config=configs/var_imagenet.py:d16 --config.tokenizer_checkpoint=ckpt/var_d16 \\
        --workdir=workdir/var_d16                 # tfds imagenet2012, prepared with file_format='array_record'
    ... --config.data.source.kind=folder --config.data.source.name= --config.data.source.path=/data/imagenet
    python -m jaxgen.sample --config=configs/var_imagenet.py:d16 --config.checkpoint=ckpt/var_d16 --workdir=OUT

The training sections are upstream's (FoundationVision/VAR): the README's "Training Scripts" command per depth and
the defaults of utils/arg_util.py and train.py, as noted field by field. What jaxgen's optimizer does differently:
the lr schedule is linear warm-up from 0 then cosine to lr * min_lr_ratio (upstream 'lin0': warm-up from 0.5% of
the lr, flat for 5%, then linear to wpe * lr), the weight decay is constant (upstream: cosine from twd to twde) and
falls on every matrix (upstream also exempts pos / level embeddings and AdaLN gammas), compute is bfloat16
(upstream fp16 with loss scaling) and the AdaLN init gain `alng` is not a field.
"""

import math

import ml_collections

from jaxgen.train.sections import imagenet_data_section, parallel_section, train_section, unknown_variant

VARIANTS = ("d16", "d20", "d24", "d30", "d36")
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
IMAGENET_TRAIN_IMAGES = 1_281_167  # tfds imagenet2012 "train"

# depth: (global batch `--bs`, epochs `--ep`, base lr `--tblr`, final lr ratio `--wpe`, final weight decay `--twde`),
# from the README's training commands; tblr defaults to 1e-4 and twde to twd = 0.05 (utils/arg_util.py).
RECIPES = {
    16: (768, 200, 1e-4, 0.1, 0.05),
    20: (768, 250, 1e-4, 0.1, 0.05),
    24: (768, 350, 8e-5, 0.01, 0.05),
    30: (1024, 350, 8e-5, 0.01, 0.08),
    36: (768, 350, 8e-5, 0.01, 0.08),  # "d36-s": --saln=1 --pn=512
}


def get_config(arg: str = "d16") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/var_imagenet.py", arg, VARIANTS)
    depth = int(arg[1:])
    patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
    batch, epochs, base_lr, final_lr_ratio, _ = RECIPES[depth]
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / batch)  # DistInfiniteBatchSampler: ceil, last batch filled
    cfg = ml_collections.ConfigDict()
    cfg.family = "var"
    cfg.seed = 0
    cfg.stages = ("generator",)
    cfg.tokenizer_checkpoint = ""  # required: a directory from `python -m jaxgen.convert var` (or a tokenizer export)
    cfg.data = imagenet_data_section(
        image_size=patch_nums[-1] * 16,  # 256 (512 for d36)
        random_flip=False,  # arg_util.py: hflip=False, and no training command turns it on (tokens: unflipped)
    )
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
        scan_layers=True,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        num_classes=1000,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=depth == 36,
        attn_l2_norm=True,
        cond_drop_rate=0.1,  # label dropout for CFG (models/var.py default)
        drop_path_rate=0.1 * depth / 24,
    )
    cfg.train_generator = train_section(
        steps=epochs * steps_per_epoch,  # d16: 200 x 1669 = 333,800
        batch_size=batch,
        accum_steps=1,  # arg_util.py: ac=1
        lr=round(base_lr * batch / 256, 12),  # arg_util.py: tlr = ac * tblr * bs / 256 (d16: 3e-4)
        min_lr_ratio=final_lr_ratio,  # wpe: the lr at the end of training / peak
        warmup_steps=round(epochs / 50 * steps_per_epoch),  # arg_util.py: wp = ep / 50 epochs
        b1=0.9,  # train.py: AdamW betas=(0.9, 0.95)
        b2=0.95,
        weight_decay=0.05,  # arg_util.py: twd=0.05 (d30 / d36 anneal it to twde=0.08; constant here)
        grad_clip=2.0,  # arg_util.py: tclip=2.0
        ema_decay=0.0,  # upstream keeps no EMA of the transformer: export the trained params
        compute_dtype="bfloat16",  # upstream --fp16=1 (fp16 autocast); bf16 needs no loss scaling
        log_every=100,
        ckpt_every=5000,
        keep_checkpoints=2,
        sample_every=10000,
    )
    # label smoothing: arg_util.py ls=0.0, which jaxgen's cross-entropy is
    # d30 / d36 (2B params): params and optimizer state split over every device (ZeRO-3 style); upstream uses DDP
    cfg.parallel = parallel_section(data=1, fsdp=-1) if depth >= 30 else parallel_section()
    cfg.sampling = dict(cfg=1.5, top_k=900, top_p=0.96, temperature=1.0, more_smooth=False)
    cfg.grid = dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4)
    cfg.eval = dict(sample_batches=0)  # class fidelity needs a digits classifier: off for ImageNet
    cfg.checkpoint = ""  # a directory written by `python -m jaxgen.convert var ...` (for jaxgen.sample)
    return cfg
