"""Defaults of the config sections that recipes share, so that configs list only what they change."""

from jaxgen.parallel.rules import DEFAULT_RULES


def digits_data_section(**overrides) -> dict:
    """The `data` section of the digits recipes: scikit-learn's bundled digits (1,797 scans, 10 classes) at 16 px RGB,
    with a fixed held-out split (see `jaxgen.data.sources`). Fields: `jaxgen.data.config`."""
    return (
        dict(
            source=dict(kind="digits", path="", name="", data_dir=""),  # every field, so a CLI override can set it
            image_size=16,
            train_split="train",
            eval_split="test",
            random_flip=False,  # digits are not mirror-symmetric
            convert_to_rgb=False,
            worker_count=0,
        )
        | overrides
    )


def imagenet_data_section(**overrides) -> dict:
    """The `data` section of the ImageNet recipes: tfds `imagenet2012` (prepared with file_format='array_record'),
    256 px, flipped. For an image folder: `source=dict(kind="folder", path=..., name="", data_dir="")`;
    convert_to_rgb is on because ImageNet's train folder holds a few grey and CMYK JPEGs."""
    return (
        dict(
            source=dict(kind="tfds", path="", name="imagenet2012", data_dir=""),
            image_size=256,
            train_split="train",
            eval_split="validation",
            random_flip=True,
            convert_to_rgb=True,
            worker_count=0,
        )
        | overrides
    )


def parallel_section(data: int = -1, fsdp: int = 1, tensor: int = 1) -> dict:
    """The `parallel` section: mesh axis sizes (one may be -1: the rest of the devices) and the logical-axis rules."""
    return dict(mesh=dict(data=data, fsdp=fsdp, tensor=tensor), rules=[list(r) for r in DEFAULT_RULES])


def train_section(**overrides) -> dict:
    """The fields of a `train_<stage>` config section (read by jaxgen.train.loop.train_stage), with overrides; an
    override that is not one of the fields is an error (a typo would otherwise be a silent new field)."""
    section = dict(
        steps=1000,
        batch_size=64,  # global batch
        accum_steps=1,  # micro-batches per step (gradients averaged)
        lr=1e-3,
        min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio (1.0: constant after the warm-up)
        warmup_steps=50,
        b1=0.9,
        b2=0.95,
        weight_decay=0.0,
        grad_clip=1.0,  # global-norm clip, 0 = off
        ema_decay=0.99,  # EMA of the params, which samplers and exports read (0 = off: the raw params)
        compute_dtype="float32",  # "bfloat16": bf16 matmuls/convs, float32 params
        log_every=25,
        ckpt_every=250,  # a multiple of log_every
        keep_checkpoints=2,  # the latest N, plus the one with the lowest logged loss
        sample_every=500,  # grids from the EMA params (0 = only at the end)
    )
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ValueError(f"train_section: unknown field {unknown[0]!r}; the fields are {', '.join(section)}")
    section.update(overrides)
    return section


def unknown_variant(config_file: str, arg: str, variants) -> ValueError:
    """The error a `get_config(arg)` raises for an `arg` it does not define, listing the ones it does."""
    named = [v for v in variants if v]
    if not named:
        return ValueError(f"{config_file} has no variant {arg!r} (it has none): use --config={config_file}")
    names = ", ".join(repr(v) for v in named) + (" or none (the default)" if "" in variants else "")
    return ValueError(
        f"{config_file}: unknown variant {arg!r}; the variants are {names}, e.g. --config={config_file}:{named[0]}"
    )


def tokenizer_loss_section(**overrides) -> dict:
    """The fields of the `tokenizer_loss` config section (`TokenizerLossConfig`), with overrides."""
    import dataclasses

    from jaxgen.train.losses.config import TokenizerLossConfig  # not the tokenizer task: configs stay light

    return dataclasses.asdict(TokenizerLossConfig(**overrides))


def digits_eval_section(**overrides) -> dict:
    """The `eval` section of the digits recipes (read by jaxgen.train.loop). An override that is not one of the
    fields is an error."""
    section = dict(
        sample_batches=5,  # the final report: x grid (10 classes x per_class) samples, class fidelity + digits FID
        every=500,  # steps between digits-FID evals during training, and one at the end (0 = off)
        fid_samples=240,  # class-balanced samples per digits-FID eval, rounded up to whole grids (3 x 80 here)
        inception_fid_images=100,  # the report's real-weight Inception FID on this many samples / held-out / train
        # images (0 = off; needs the weights, docs/evaluation.md); 300 Inception passes at 299 px: ~2 min on 2 cores
    )
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ValueError(f"digits_eval_section: unknown field {unknown[0]!r}; the fields are {', '.join(section)}")
    section.update(overrides)
    return section


def make_smoke(cfg) -> None:
    """Turn a recipe into its `smoke` variant in place: 10 steps per stage, with a checkpoint, a grid, a digits-FID
    eval and the report still written (what CI and `--config=...:smoke` run); no Inception FID."""
    for name in ("train_tokenizer", "train_generator"):
        if name in cfg:
            cfg[name].update(steps=10, log_every=5, ckpt_every=10, sample_every=10, warmup_steps=2)
    if "grid" in cfg:
        cfg.grid.per_class = 2
    if "eval" in cfg:
        cfg.eval.sample_batches = 1
        if "every" in cfg.eval:
            cfg.eval.update(every=10, fid_samples=20, inception_fid_images=0)  # one eval of one grid (10 x 2)
