"""The Axial Transformer on ImageNet 32x32 / 64x64 (unconditional, 8-bit RGB): `--config=configs/axial_imagenet.py:
imagenet32` or `:imagenet64`, the official configs (google-research `axial/config_imagenet{32,64}.py`).

| | D | heads | MLP | exterior / outer / inner layers | dropout | lr | parameters |
|---|---|---|---|---|---|---|---|
| imagenet32 | 1536 | 16 | x1 | 8 / 8 / 8 | 0.04 | 1e-4 | 341,178,112 |
| imagenet64 | 2048 | 16 | x1 | 8 / 8 / 8 | 0.0 | 2e-4 | 606,161,152 |

Training as upstream: Adam (0.9, 0.999) without weight decay, 5000 warm-up steps then the constant rate, gradient
clipping at 1.0, EMA 0.99995 (what evaluation and sampling read), batch 64, one random channel per image. The trained
weights were never released; a TF checkpoint converts with `python -m jaxgen.convert axial --weights ...
--config configs/axial_imagenet.py:imagenet32 --out DIR` (docs/axial.md).
"""

import ml_collections

from jaxgen.train.sections import imagenet_data_section, parallel_section, train_section, unknown_variant

VARIANTS = ("imagenet32", "imagenet64")
RELEASED = {
    "imagenet32": dict(image_size=32, hidden_size=1536, dropout=0.04, lr=1e-4),
    "imagenet64": dict(image_size=64, hidden_size=2048, dropout=0.0, lr=2e-4),
}


def get_config(arg: str = "imagenet32") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/axial_imagenet.py", arg, VARIANTS)
    r = RELEASED[arg]
    size = r["image_size"]
    cfg = ml_collections.ConfigDict()
    cfg.family = "axial"
    cfg.seed = 0
    cfg.stages = ("generator",)
    cfg.checkpoint = ""  # a converted checkpoint, for jaxgen.sample
    cfg.data = imagenet_data_section(image_size=size, random_flip=False)  # the pixel shards are written once
    cfg.pixels = dict(channels=3)
    cfg.axial = dict(
        attn_backend="xla",  # "pallas": pallas_kernels.axial_attention on a GPU / TPU (docs/attention.md)
        height=size,
        width=size,
        hidden_size=r["hidden_size"],
        num_heads=16,
        mlp_factor=1,
        num_outer_layers=8,
        num_inner_layers=8,
        num_exterior_layers=8,
        num_classes=0,
        dropout=r["dropout"],
        emb_init_scale=5.0,
        res_init_scale=1e-10,
        logits_init_scale=1e-10,
    )
    cfg.train_generator = train_section(
        steps=1_000_000,  # the official configs set no step count
        batch_size=64,
        lr=r["lr"],
        min_lr_ratio=1.0,  # constant after the warm-up
        warmup_steps=5000,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.99995,
        compute_dtype="bfloat16",
        log_every=100,
        ckpt_every=10_000,
        sample_every=10_000,
    )
    cfg.parallel = parallel_section()
    cfg.sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=(0, 0, 0, 0), per_class=4)  # unconditional: the labels only set the batch
    cfg.eval = dict(sample_batches=0)  # class fidelity needs a digits classifier: off for ImageNet
    return cfg
