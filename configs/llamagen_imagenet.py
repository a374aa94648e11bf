"""LlamaGen class-conditional ImageNet models: `--config=configs/llamagen_imagenet.py:L` (B, L, XL, XXL, 3B), with an
optional image size `L_384` (256 or 384; default: the size each model was released at, B/L 256 and XL/XXL/3B 384).

GPT sizes follow upstream's GPT_models (dim / layers / heads): B 768/12/12, L 1024/24/16, XL 1280/36/20,
XXL 1536/48/24, 3B 3200/24/32 (head_dim 100). None uses grouped KV heads or an ffn_dim_multiplier; the SwiGLU width
is int(8 * dim / 3) rounded up to 256. One tokenizer for all: VQ-16 (`vq_ds16_c2i.pt`), 16x downsampling, so
block_size = (image_size // 16)**2.
"""

import ml_collections

GPT_SIZES = {  # dim, n_layer, n_head
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
    "XXL": (1536, 48, 24),
    "3B": (3200, 24, 32),
}
RELEASED_IMAGE_SIZE = {"B": 256, "L": 256, "XL": 384, "XXL": 384, "3B": 384}


def get_config(arg: str = "B") -> ml_collections.ConfigDict:
    name, _, size = arg.partition("_")
    if name not in GPT_SIZES or size not in ("", "256", "384"):
        raise ValueError(f"unknown variant {arg!r}: choose one of {list(GPT_SIZES)}, optionally with _256 or _384")
    image_size = int(size) if size else RELEASED_IMAGE_SIZE[name]
    dim, n_layer, n_head = GPT_SIZES[name]
    cfg = ml_collections.ConfigDict()
    cfg.family = "llamagen"
    cfg.seed = 0
    cfg.image_size = image_size
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
        class_dropout_prob=0.1,
    )
    # Upstream's demo (sample_c2i.py) uses cfg_scale 4.0 and top_k 2000; its FID script (sample_c2i_ddp.py) uses
    # cfg_scale 1.5 (per-model values in the paper) and top_k 0 (off).
    cfg.sampling = dict(cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    cfg.grid = dict(classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4)
    cfg.checkpoint = ""  # a directory written by the converter (GPT + VQ params)
    return cfg
