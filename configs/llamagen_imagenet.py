"""LlamaGen class-conditional ImageNet models: `--config=configs/llamagen_imagenet.py:L` (B, L, XL, XXL, 3B), with an
optional image size `L_384` (256 or 384; default: the size each model was released at, B/L 256 and XL/XXL/3B 384).

GPT sizes follow upstream's GPT_models (dim / layers / heads): B 768/12/12, L 1024/24/16, XL 1280/36/20,
XXL 1536/48/24, 3B 3200/24/32 (head_dim 100). None uses grouped KV heads or an ffn_dim_multiplier; the SwiGLU width
is int(8 * dim / 3) rounded up to 256. One tokenizer for all: VQ-16 (`vq_ds16_c2i.pt`), 16x downsampling, so
block_size = (image_size // 16)**2.

Training trains the GPT on a converted (or jaxgen-trained) VQ-16, as upstream does:

    python -m jaxgen.convert llamagen --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out ckpt/llamagen_B
    python -m jaxgen.main --config=configs/llamagen_imagenet.py:B --config.tokenizer_checkpoint=ckpt/llamagen_B \\
        --workdir=workdir/llamagen_B              # tfds imagenet2012, prepared with file_format='array_record'
    ... --config.data.source.kind=folder --config.data.source.name= --config.data.source.path=/data/imagenet

The training section is upstream's (FoundationVision/LlamaGen autoregressive/train/train_c2i.py argparse defaults,
which GETTING_STARTED.md's commands keep): AdamW lr 1e-4 constant (no scheduler), weight decay 5e-2 on tensors of
>= 2 dims (as jaxgen's optimizer), betas (0.9, 0.95), grad clip 1.0, global batch 256, 300 epochs, bf16 autocast,
no EMA (`--ema` is off and no command sets it; with it the decay is 0.9999, utils/ema.py), class dropout 0.1. Not
modelled: upstream's dropout 0.1 on the token embeddings (`--token-dropout-p`), residuals and FFN (`--dropout-p`),
which jaxgen's GPT has no fields for; and its ten-crop + flip code extraction (jaxgen tokenizes one centre crop).
"""

import ml_collections

from jaxgen.train.sections import imagenet_data_section, parallel_section, train_section, unknown_variant

GPT_SIZES = {  # dim, n_layer, n_head
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
    "XXL": (1536, 48, 24),
    "3B": (3200, 24, 32),
}
RELEASED_IMAGE_SIZE = {"B": 256, "L": 256, "XL": 384, "XXL": 384, "3B": 384}
VARIANTS = tuple(GPT_SIZES) + tuple(f"{n}_{s}" for n in GPT_SIZES for s in (256, 384))
IMAGENET_TRAIN_IMAGES = 1_281_167  # tfds imagenet2012 "train"
BATCH = 256  # train_c2i.py: --global-batch-size 256
EPOCHS = 300  # train_c2i.py: --epochs 300


def get_config(arg: str = "B") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/llamagen_imagenet.py", arg, VARIANTS)
    name, _, size = arg.partition("_")
    image_size = int(size) if size else RELEASED_IMAGE_SIZE[name]
    dim, n_layer, n_head = GPT_SIZES[name]
    cfg = ml_collections.ConfigDict()
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.image_size = image_size  # = data.image_size (kept for the sampling binary and its tests)
    cfg.stages = ("generator",)
    cfg.tokenizer_checkpoint = ""  # required: a directory from `python -m jaxgen.convert llamagen` (or an export)
    cfg.data = imagenet_data_section(
        image_size=image_size,
        random_flip=False,  # token shards are written once, unflipped (upstream also extracts codes of flipped crops)
    )
    cfg.vq = dict(  # VQ-16; the decoder runs num_res_blocks + 1 = 3 res blocks per level
        codebook_size=16384,
        codebook_embed_dim=8,
        z_channels=256,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
    )
    cfg.gpt = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=True,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        vocab_size=16384,
        num_classes=1000,
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=None,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_base=10000.0,
        cls_token_num=1,
        block_size=(image_size // 16) ** 2,
        class_dropout_prob=0.1,  # gpt.py ModelArgs: class_dropout_prob=0.1 (CFG)
    )
    cfg.train_generator = train_section(
        steps=EPOCHS * (IMAGENET_TRAIN_IMAGES // BATCH),  # DataLoader(drop_last=True): 5004 steps/epoch -> 1,501,200
        batch_size=BATCH,
        accum_steps=1,  # --gradient-accumulation-steps 1
        lr=1e-4,  # --lr 1e-4, constant: no warm-up, no decay
        min_lr_ratio=1.0,
        warmup_steps=0,
        b1=0.9,  # --beta1 0.9
        b2=0.95,  # --beta2 0.95
        weight_decay=5e-2,  # --weight-decay 5e-2
        grad_clip=1.0,  # --max-grad-norm 1.0
        ema_decay=0.0,  # --ema off
        compute_dtype="bfloat16",  # --mixed-precision bf16
        log_every=100,  # --log-every 100
        ckpt_every=5000,  # --ckpt-every 5000
        keep_checkpoints=2,
        sample_every=10000,
    )
    # XXL / 3B: upstream trains them with FSDP (scripts/autoregressive/train_c2i_fsdp.sh); B / L / XL with DDP
    cfg.parallel = parallel_section(data=1, fsdp=-1) if name in ("XXL", "3B") else parallel_section()
    # Upstream's demo (sample_c2i.py) uses cfg_scale 4.0 and top_k 2000; its FID script (sample_c2i_ddp.py) uses
    # cfg_scale 1.5 (per-model values in the paper) and top_k 0 (off).
    cfg.sampling = dict(cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4)
    cfg.eval = dict(sample_batches=0)  # class fidelity needs a digits classifier: off for ImageNet
    cfg.checkpoint = ""  # a directory written by the converter (GPT + VQ params), for jaxgen.sample
    return cfg
