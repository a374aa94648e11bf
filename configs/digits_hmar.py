"""HMAR on the embedded scikit-learn digits (16 px RGB, 10 classes), on a laptop CPU, beside configs/digits_var.py.

    python -m jaxgen.main --config=configs/digits_hmar.py --workdir=workdir/digits_hmar
    python -m jaxgen.main --config=configs/digits_hmar.py:smoke --workdir=/tmp/digits_hmar_smoke  # < 3 min

The same tokenizer and transformer sizes as digits_var (scales 1-2-3-4, 30 tokens; depth 4, width 128), with HMAR's
block-diagonal mask and its two training stages: "generator" (stage 1, next-scale, lognorm loss weights; its report
samples without refinement) and "mask" (stage 2, the top `mask_layers` blocks' masked-prediction branch; its report
samples with `sampling.mask_schedule`). The schedule is a sampling setting: `--config.sampling.mask_schedule=...`
or `jaxgen.sample` change it without retraining.
"""

from pathlib import Path

import ml_collections

from jaxgen.config_util import load_config
from jaxgen.train.sections import train_section, unknown_variant

VARIANTS = ("", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/digits_hmar.py", arg, VARIANTS)
    cfg = load_config(f"{Path(__file__).with_name('digits_var.py')}:{arg}")
    cfg.family = "hmar"
    cfg.stages = ("tokenizer", "generator", "mask")
    hmar = dict(cfg.var)
    del cfg["var"]
    cfg.hmar = dict(hmar, mask_layers=2, loss_weighting="lognorm")
    cfg.train_mask = train_section(steps=600, lr=5e-4, weight_decay=0.05, sample_every=300)
    if arg == "smoke":
        cfg.train_mask.update(steps=10, log_every=5, ckpt_every=10, sample_every=10, warmup_steps=2)
    # per scale (n_0, n_1, ...): the 2x2 scale re-predicts its 3 least confident tokens in one step, the 3x3 scale
    # 8 then 5 over two steps (as the released 256 px benchmark schedule), the 4x4 scale 12 then 6
    cfg.sampling = dict(cfg.sampling.to_dict(), refine=True, mask_schedule=((1,), (1, 3), (1, 3, 5), (4, 6, 6)))
    del cfg.sampling["more_smooth"]
    return cfg
