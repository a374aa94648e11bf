"""Convert official checkpoints into a jaxgen Orbax checkpoint.

    python -m jaxgen.convert var --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR [--config SPEC]
    python -m jaxgen.convert llamagen --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out DIR [--config SPEC]

Without --config the model sizes are read off the checkpoint itself (VAR: depth, width, heads, classes, patch_nums
from the `lvl_1L` buffer; LlamaGen: widths, layers, vocab, classes, heads from upstream's size table). The output
loads with `jaxgen.train.checkpoint.load_pretrained` and samples with
`python -m jaxgen.sample --config=... --config.checkpoint=DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxgen.config_util import load_config
from jaxgen.convert.common import ConversionError, load_state_dict
from jaxgen.convert.llamagen import check_vocab, convert_gpt, convert_vq, infer_gpt_config, infer_vq_config
from jaxgen.convert.lpips import convert_lpips_files
from jaxgen.convert.var import (
    convert_var,
    convert_vqvae,
    infer_var_config,
    infer_vqvae_config,
    patch_nums_from_levels,
)
from jaxgen.models.registry import build_llamagen, build_var
from jaxgen.train.checkpoint import save_pretrained


def convert_var_family(args) -> int:
    vae_sd, var_sd = load_state_dict(args.vae), load_state_dict(args.var)
    if args.config:
        cfg = load_config(args.config)
        vae, var = build_var(cfg.vae, cfg.var)
        vae_cfg, var_cfg = vae.config, var.config
    else:
        if "lvl_1L" not in var_sd:
            raise ConversionError("the VAR state_dict has no lvl_1L buffer to read patch_nums from; pass --config")
        patch_nums = patch_nums_from_levels(var_sd["lvl_1L"])
        vae_cfg = infer_vqvae_config({k: v.shape for k, v in vae_sd.items()}, patch_nums)
        var_cfg = infer_var_config({k: v.shape for k, v in var_sd.items()}, patch_nums=patch_nums)
        print(f"read off the checkpoints: VQVAE {vae_cfg}\nVAR {var_cfg}")
    params = {"vae": convert_vqvae(vae_sd, vae_cfg), "var": convert_var(var_sd, var_cfg)}
    config = {"family": "var", "vae": dataclasses.asdict(vae_cfg), "var": dataclasses.asdict(var_cfg)}
    out = save_pretrained(args.out, params, config)
    print(f"wrote {out}")
    return 0


def convert_llamagen_family(args) -> int:
    vq_sd, gpt_sd = load_state_dict(args.vq), load_state_dict(args.gpt)
    if args.config:
        cfg = load_config(args.config)
        vq, gpt = build_llamagen(cfg.vq, cfg.gpt)
        vq_cfg, gpt_cfg = vq.config, gpt.config
    else:
        vq_cfg = infer_vq_config({k: v.shape for k, v in vq_sd.items()})
        gpt_cfg = infer_gpt_config({k: v.shape for k, v in gpt_sd.items()}, block_size=args.block_size)
        print(f"read off the checkpoints: VQ {vq_cfg}\nGPT {gpt_cfg}")
    check_vocab(gpt_cfg, vq_cfg.codebook_size)
    params = {"vq": convert_vq(vq_sd, vq_cfg), "gpt": convert_gpt(gpt_sd, gpt_cfg)}
    config = {"family": "llamagen", "vq": dataclasses.asdict(vq_cfg), "gpt": dataclasses.asdict(gpt_cfg)}
    print(f"wrote {save_pretrained(args.out, params, config)}")
    return 0


def convert_lpips_weights(args) -> int:
    print(f"wrote {convert_lpips_files(args.vgg16, args.lin or None, args.out or None)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgen.convert", description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="family", required=True)
    p = sub.add_parser("var", help="FoundationVision/VAR: VQVAE + VAR transformer")
    p.add_argument("--vae", required=True, help="VQVAE state_dict (.pth / .npz / .safetensors)")
    p.add_argument("--var", required=True, help="VAR transformer state_dict (.pth / .npz / .safetensors)")
    p.add_argument("--out", required=True, help="output directory (Orbax checkpoint + config.json)")
    p.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")
    p.set_defaults(run=convert_var_family)
    p = sub.add_parser("llamagen", help="FoundationVision/LlamaGen: VQ tokenizer + class-conditional GPT")
    p.add_argument("--vq", required=True, help="VQ tokenizer checkpoint (.pt / .npz / .safetensors)")
    p.add_argument("--gpt", required=True, help="GPT checkpoint (.pt / .npz / .safetensors)")
    p.add_argument("--out", required=True, help="output directory (Orbax checkpoint + config.json)")
    p.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")
    p.add_argument("--block-size", type=int, default=256, help="image tokens without --config (256 = 16x16)")
    p.set_defaults(run=convert_llamagen_family)
    p = sub.add_parser("lpips", help="LPIPS perceptual loss: torchvision VGG16 + lpips linear heads -> one .npz")
    p.add_argument("--vgg16", required=True, help="torchvision ImageNet VGG16 state_dict (vgg16-397923af.pth)")
    p.add_argument("--lin", default="", help="LPIPS linear heads (default: the lpips package's weights/v0.1/vgg.pth)")
    p.add_argument("--out", default="", help="output .npz (default: $JAXGEN_LPIPS_WEIGHTS or ~/.cache/jaxgen/...)")
    p.set_defaults(run=convert_lpips_weights)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
