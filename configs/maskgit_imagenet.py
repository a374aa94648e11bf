"""MaskGIT class-conditional ImageNet, the released models: `--config=configs/maskgit_imagenet.py:256` or `:512`.

One tokenizer for both (fully convolutional, 16x down-sampling, 1024 codes of width 256); the transformer is BERT
base-width with 24 layers (hidden 768, 16 heads, MLP 3072), 1024 + 1000 + 1 = 2025 vocabulary rows, and a position
per token plus the class token (257 at 256 px, 1025 at 512 px). Converted from the released Flax checkpoints:

    python -m jaxgen.convert maskgit --tokenizer tokenizer_imagenet256_checkpoint \\
        --transformer maskgit_imagenet256_checkpoint --out ckpt/maskgit_256
    python -m jaxgen.sample --config=configs/maskgit_imagenet.py:256 --config.checkpoint=ckpt/maskgit_256 --workdir=OUT

Training trains the transformer on a converted tokenizer, with the official config's recipe
(maskgit/configs/maskgit_class_cond_config.py over base_config.py): AdamW lr 1e-4 after a 5000-step linear warm-up,
then constant (base_config's lr_schedule "constant"), betas (0.9, 0.96), weight decay 0.045, global batch 256,
2,000,000 steps, EMA (polyak) 0.999, dropout 0.1 on hidden states and attention probabilities, label smoothing 0.1,
the cosine mask schedule. Google did not release the training loop; what jaxgen's does that the config does not
say: the loss covers only the masked tokens (the config's compute_loss_for_all=False), r ~ U[0, 1) per sample, and
jaxgen's weight decay falls on every matrix. The config's min_masking_rate (0.5) has no reader in the release and is
not modelled. Sampling: choice temperature 4.5 and the cosine schedule (sample_choice_temperature); 8 steps at
256 px and 12 at 512 px, the paper's settings (the demo's class-conditional call uses 16).
"""

import ml_collections

from jaxgen.train.sections import imagenet_data_section, parallel_section, train_section, unknown_variant

VARIANTS = ("256", "512")
DECODE_STEPS = {256: 8, 512: 12}  # the paper's Table 1 / 512 px settings


def get_config(arg: str = "256") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/maskgit_imagenet.py", arg, VARIANTS)
    image_size = int(arg)
    cfg = ml_collections.ConfigDict()
    cfg.family = "maskgit"
    cfg.seed = 42  # base_config.seed
    cfg.image_size = image_size  # = data.image_size (kept for the sampling binary)
    cfg.stages = ("generator",)
    cfg.tokenizer_checkpoint = ""  # required: a directory from `python -m jaxgen.convert maskgit` (or an export)
    cfg.checkpoint = ""  # a converted checkpoint (both models), for jaxgen.sample
    cfg.data = imagenet_data_section(image_size=image_size, random_flip=False)  # token shards are written once
    cfg.vq = dict(
        codebook_size=1024,
        embedding_dim=256,
        filters=128,
        channel_multipliers=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        beta=0.25,  # commitment_cost
    )
    cfg.maskgit = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md (training with attention dropout: "xla")
        scan_layers=True,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        codebook_size=1024,
        num_classes=1000,
        num_tokens=(image_size // 16) ** 2,
        hidden_size=768,
        num_layers=24,
        num_heads=16,
        intermediate_size=3072,
        dropout=0.1,  # transformer.dropout_rate
        attention_dropout=0.1,  # attention_probs_dropout_prob = dropout_rate
        class_dropout_prob=0.0,  # no null class in the release (guidance is a jaxgen extension)
        initializer_range=0.02,
        mask_schedule="cosine",  # mask_scheduling_method
        label_smoothing=0.1,
    )
    cfg.train_generator = train_section(
        steps=2_000_000,  # num_train_steps
        batch_size=256,
        accum_steps=1,
        lr=1e-4,
        min_lr_ratio=1.0,  # constant after the warm-up
        warmup_steps=5000,
        b1=0.9,
        b2=0.96,
        weight_decay=0.045,
        grad_clip=0.0,  # the config names no clipping
        ema_decay=0.999,  # polyak_decay
        compute_dtype="bfloat16",
        log_every=100,
        ckpt_every=10_000,  # checkpoint_every_steps
        keep_checkpoints=2,
        sample_every=10_000,  # eval_every_steps
    )
    cfg.parallel = parallel_section()
    cfg.sampling = dict(
        num_iter=DECODE_STEPS[image_size],
        start_iter=0,
        choice_temperature=4.5,
        schedule="cosine",
        temperature=1.0,
        top_k=0,
        cfg_scale=0.0,
    )
    cfg.grid = dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4)
    cfg.eval = dict(sample_batches=0)  # class fidelity needs a digits classifier: off for ImageNet
    return cfg
