"""A small LlamaGen with ImageNet's vocabulary and classes for CPU benchmarks: 256 px through VQ-16's structure
(16x downsampling, so a 16x16 grid = 256 tokens, the real count), codebook 16384 x 8, 1000 classes, a GPT of dim 256 /
4 layers / 4 heads (head_dim 64 as in GPT-B and GPT-L) and a narrow tokenizer (ch 32, z_channels 32). Top-k settings
mean the same as at full size; a batch of 64 samples in tens of seconds on 2 cores.

Sampling: LlamaGen's FID settings (sample_c2i_ddp.py: cfg_scale 2.0 as used for GPT-B/L, top_k 0, top_p 1.0,
temperature 1.0), which `experiments/bench_llamagen_sampling.py` also uses by default."""

import ml_collections

from jaxgen.train.sections import unknown_variant

VARIANTS = ("",)  # no named variants: --config=configs/llamagen_small.py


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise unknown_variant("configs/llamagen_small.py", arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.image_size = 256
    cfg.vq = dict(  # channels per level 32, 32, 64, 64, 128; the decoder runs 3 res blocks per level
        codebook_size=16384,
        codebook_embed_dim=8,
        z_channels=32,
        ch=32,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
    )
    cfg.gpt = dict(
        attn_backend="xla",  # "xla" | "cudnn" | "pallas": docs/attention.md
        scan_layers=False,  # True: the blocks as one scanned layer, compiled once whatever the depth (docs/speed.md)
        remat="none",  # what backward keeps per block: "none" | "full" | "dots" | "dots_no_batch"
        vocab_size=16384,
        num_classes=1000,
        dim=256,
        n_layer=4,
        n_head=4,
        n_kv_head=None,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_base=10000.0,
        cls_token_num=1,
        block_size=(256 // 16) ** 2,
        class_dropout_prob=0.1,
    )
    cfg.sampling = dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=(207, 360, 387, 974), per_class=4)
    cfg.checkpoint = ""
    return cfg
