"""Class-conditional sampling binary: a grid of samples per class as PNG, the token ids as .npz, a report as JSON.

    python -m jaxgen.sample --config=configs/var_tiny.py --workdir=workdir/var_tiny
    python -m jaxgen.sample --config=configs/var_imagenet.py:d16 --config.checkpoint=DIR --workdir=...
    python -m jaxgen.sample --config=configs/digits_var.py --config.checkpoint=workdir/digits_var --workdir=...

`config.checkpoint`: a directory written by `python -m jaxgen.convert`, or a training run's workdir (its
`generator/export`: the EMA params of both models); random weights when empty. The training and the sampling
binary read the same config file. A user error ends in one `error:` line (the traceback with `--verbosity=1`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxgen import cli
from jaxgen.convert.common import count_params
from jaxgen.eval.grids import save_grid
from jaxgen.families import build_models, init_family_params, param_shapes
from jaxgen.pretrained import load_pretrained

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the grid, tokens and report are written")


def init_or_load(config):
    """(family, tokenizer, generator, params) with params = {tokenizer key: ..., generator key: ...} from
    `config.checkpoint` (shapes and family checked against the config) or, if empty, a seeded random init."""
    family, tokenizer, generator = build_models(config)
    if generator is None:
        raise ValueError(f"config has no `{family.generator_key}` section: there is no generator to sample")
    if config.get("checkpoint"):
        _, params = load_pretrained(config.checkpoint, param_shapes(family, tokenizer, generator), family=family.name)
    else:
        params = init_family_params(family, tokenizer, generator, config.seed)
    return family, tokenizer, generator, params


def sample_grid(config, workdir: str | Path) -> dict:
    """Sample `config.grid.per_class` images for each of `config.grid.classes`; write grid.png, samples.npz (labels,
    images and the token ids) and report.json under `workdir`; return the report."""
    workdir = Path(workdir)
    family, tokenizer, generator, params = init_or_load(config)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, tree in params.items():
        logging.info("%s: %.2fM params", name, count_params(tree) / 1e6)
    classes = tuple(config.grid.classes)
    labels = np.repeat(np.asarray(classes, np.int32), config.grid.per_class)
    sampler = family.sampler(generator, tokenizer, config.sampling.to_dict())
    t0 = time.perf_counter()
    out = sampler(params[family.generator_key], params[family.tokenizer_key], labels, sampling_key(config))
    images = np.asarray(jax.device_get(out.images))
    wall_s = time.perf_counter() - t0  # includes the one compile; experiments/bench_*_sampling.py separate them
    grid_path = save_grid(
        images,
        workdir / "grid.png",
        nrow=config.grid.per_class,
        row_labels=[f"class {c}" for c in classes],
        scale=max(1, 128 // images.shape[1]),
    )
    np.savez(workdir / "samples.npz", labels=labels, images=images, **out.token_arrays())
    report = {
        "family": family.name,
        "grid": str(grid_path),
        "num_images": len(labels),
        "image_size": int(images.shape[1]),
        "wall_s_with_compile": round(wall_s, 3),
        "checkpoint": config.get("checkpoint") or None,
        "device": jax.devices()[0].device_kind,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def sampling_key(config) -> jax.Array:
    """The PRNG key of a config's grid: `config.seed + 1`."""
    return jax.random.key(int(config.seed) + 1)


def run(config, workdir: str) -> dict:
    cli.check_writable_dir(workdir)
    return sample_grid(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = cli.run_user_command(run, _CONFIG.value, _WORKDIR.value)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
