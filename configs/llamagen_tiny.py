"""A tiny LlamaGen (64 px, 4x4 tokens, 10 classes; the sizes of the reference fixture A) that builds and samples in
seconds on a CPU: tests and demos. Random weights unless `checkpoint` points at a converted or trained one."""

import ml_collections

from jaxgen.train.sections import unknown_variant

VARIANTS = ("",)  # no named variants: --config=configs/llamagen_tiny.py


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise unknown_variant("configs/llamagen_tiny.py", arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.vq = dict(codebook_size=64, codebook_embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2, 4),
                  num_res_blocks=2)  # fmt: skip
    cfg.gpt = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=False,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        vocab_size=64,
        num_classes=10,
        dim=64,
        n_layer=2,
        n_head=4,
        block_size=16,
        class_dropout_prob=0.1,
    )
    cfg.sampling = dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=16, top_p=1.0)
    cfg.grid = dict(classes=tuple(range(10)), per_class=4)
    cfg.checkpoint = ""
    return cfg
