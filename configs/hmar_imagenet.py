"""HMAR on ImageNet 256 px, the released models: `--config=configs/hmar_imagenet.py:d16` (d16, d20, d24, d30).

Sizes and the stage-1 recipe are VAR's of the same depth (configs/var_imagenet.py: width 64*depth, heads = depth,
the same VQVAE, batch, epochs, lr, weight decay, clip), with upstream's (NVlabs/HMAR `config/experiment/`) changes:

    hmar-train-d*          stage "generator": block-diagonal mask, `reweight_loss: True, loss_reweight_type:
                           "lognorm"` (hmar.loss_weighting)
    hmar-finetune-mask-d*  stage "mask": `n_layers_train: 8` (hmar.mask_layers), `ep: 100`, the same bs / lr /
                           wpe / twde; loss "mask_unweighted" (mean cross-entropy over the masked positions)
    config/sample/hmar-d*  cfg / top_k / top_p: d16 1.7/1000/0.99, d20 1.9/950/0.99, d24 2.1/900/0.99,
                           d30 1.7/1000/0.99; the released mask schedule (`SCHEDULE` below)

    python -m jaxgen.convert hmar --vae vae_ch160v4096z32.pth --hmar hmar-d16.pth --out ckpt/hmar_d16
    python -m jaxgen.sample --config=configs/hmar_imagenet.py:d16 --config.checkpoint=ckpt/hmar_d16 --workdir=OUT
    python -m jaxgen.main --config=configs/hmar_imagenet.py:d16 --config.tokenizer_checkpoint=ckpt/hmar_d16 \\
        --workdir=workdir/hmar_d16                # both stages; tfds imagenet2012 (array_record)
"""

import math
from pathlib import Path

import ml_collections

from jaxgen.config_util import load_config
from jaxgen.train.sections import unknown_variant

VARIANTS = ("d16", "d20", "d24", "d30")
SAMPLING = {16: (1.7, 1000, 0.99), 20: (1.9, 950, 0.99), 24: (2.1, 900, 0.99), 30: (1.7, 1000, 0.99)}
MASK_STAGE_EPOCHS = 100
# upstream's released schedule (utils/sampling_arg_util.py; = jaxgen.sampling.hmar.RELEASED_SCHEDULE): per scale
# (n_0, n_1, ...); the 2x2 scale re-predicts 3 tokens in one step, the 3x3 scale 8, 7 and 5 over three steps
SCHEDULE = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))


def get_config(arg: str = "d16") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise unknown_variant("configs/hmar_imagenet.py", arg, VARIANTS)
    depth = int(arg[1:])
    cfg = load_config(f"{Path(__file__).with_name('var_imagenet.py')}:{arg}")
    cfg.family = "hmar"
    cfg.stages = ("generator", "mask")
    cfg.hmar = dict(cfg.var.to_dict(), mask_layers=8, loss_weighting="lognorm")
    del cfg["var"]
    stage1 = cfg.train_generator.to_dict()
    steps_per_epoch = math.ceil(1_281_167 / stage1["batch_size"])
    cfg.train_mask = dict(
        stage1,
        steps=MASK_STAGE_EPOCHS * steps_per_epoch,
        warmup_steps=round(MASK_STAGE_EPOCHS / 50 * steps_per_epoch),  # upstream wp = ep / 50 epochs
    )
    scale, top_k, top_p = SAMPLING[depth]
    cfg.sampling = dict(cfg=scale, top_k=top_k, top_p=top_p, temperature=1.0, refine=True, mask_schedule=SCHEDULE)
    return cfg
