"""The Axial Transformer on the embedded scikit-learn digits: 8-bit grey pixels at 16 px (256 values per image, no
tokenizer), class-conditional, through the same loop as the other digits recipes.

    python -m jaxgen.main --config=configs/digits_axial.py --workdir=workdir/digits_axial
    python -m jaxgen.main --config=configs/digits_axial.py:smoke --workdir=/tmp/digits_axial_smoke
    python -m jaxgen.main --config=configs/digits_axial.py:rgb --workdir=workdir/digits_axial_rgb

The report has the held-out bits per dim (every pixel of the 296 held-out digits, teacher forced) beside the class
fidelity and digits FID of the samples. `rgb` models the three (equal) channels one at a time with the conditioning
stack, as the ImageNet model does; `uncond` is upstream's unconditional model (num_classes 0).
"""

import ml_collections

from jaxgen.train.sections import (
    digits_data_section,
    digits_eval_section,
    make_smoke,
    parallel_section,
    train_section,
    unknown_variant,
)

VARIANTS = ("", "smoke", "rgb", "rgb_smoke", "uncond")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.family = "axial"
    cfg.seed = 0
    cfg.stages = ("generator",)  # pixels: nothing to tokenize
    cfg.checkpoint = ""  # jaxgen.sample: a converted checkpoint, or this run's workdir (its generator/export)
    cfg.data = digits_data_section()
    cfg.pixels = dict(channels=1)
    cfg.axial = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas" (pallas_kernels.axial_attention): docs/attention.md
        height=16,
        width=16,
        hidden_size=64,
        num_heads=4,
        mlp_factor=2,
        num_outer_layers=4,
        num_inner_layers=2,
        num_exterior_layers=2,  # rgb only
        num_classes=10,
        dropout=0.0,
        res_init_scale=1e-10,  # upstream's near-zero residual and logit projections at the start
        logits_init_scale=1e-10,
    )
    cfg.train_generator = train_section(steps=1500, lr=2e-3, warmup_steps=100, b2=0.99, sample_every=500)
    cfg.parallel = parallel_section()
    cfg.sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=tuple(range(10)), per_class=8)
    cfg.eval = digits_eval_section()
    if arg in ("rgb", "rgb_smoke"):
        cfg.pixels.channels = 3
    if arg == "uncond":
        cfg.axial.num_classes = 0
    if arg in ("smoke", "rgb_smoke"):
        make_smoke(cfg)
    elif arg not in VARIANTS:
        raise unknown_variant("configs/digits_axial.py", arg, VARIANTS)
    return cfg
