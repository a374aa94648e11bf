"""Class-conditional sampling binary: a grid of samples per class as PNG, the tokens as .npz, timings as JSON.

    python -m jaxgen.sample --config=configs/var_tiny.py --workdir=workdir/var_tiny
    python -m jaxgen.sample --config=configs/var_imagenet.py:d16 --config.checkpoint=DIR --workdir=...

Random weights unless `config.checkpoint` names a directory written by `python -m jaxgen.convert`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxgen.convert.common import count_params
from jaxgen.eval.grids import save_grid
from jaxgen.models.registry import build_var, init_params
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.train.checkpoint import load_pretrained

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the grid, tokens and report are written")


def init_or_load_var(config):
    """(vae, var, vae_params, var_params) from `config.checkpoint` or, if empty, a seeded random init."""
    vae, var = build_var(config.vae, config.var)
    s = vae.config.image_size
    x_tf = jnp.zeros((1, var.config.seq_len - var.config.first_l, var.config.z_channels))
    key_vae, key_var = jax.random.split(jax.random.key(config.seed))
    if config.checkpoint:
        expected = {
            "vae": jax.eval_shape(vae.init, key_vae, jnp.zeros((1, s, s, 3)))["params"],
            "var": jax.eval_shape(var.init, key_var, jnp.zeros((1,), jnp.int32), x_tf)["params"],
        }
        _, params = load_pretrained(config.checkpoint, expected)
        return vae, var, params["vae"], params["var"]
    vae_params = init_params(vae, key_vae, jnp.zeros((1, s, s, 3)))
    var_params = init_params(var, key_var, jnp.zeros((1,), jnp.int32), x_tf)
    return vae, var, vae_params, var_params


def sample_grid(config, workdir: str | Path) -> dict:
    """Sample `config.grid.per_class` images for each of `config.grid.classes`; write grid.png, samples.npz and
    report.json under `workdir`; return the report."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vae, var, vae_params, var_params = init_or_load_var(config)
    logging.info("VQVAE %.2fM params, VAR %.2fM params", count_params(vae_params) / 1e6, count_params(var_params) / 1e6)
    classes = tuple(config.grid.classes)
    labels = np.repeat(np.asarray(classes, np.int32), config.grid.per_class)
    sampler = NextScaleSampler(var, vae, NextScaleSampling(**config.sampling.to_dict()))
    key = jax.random.key(config.seed + 1)
    t0 = time.perf_counter()
    out = sampler(var_params, vae_params, labels, key)
    images = np.asarray(jax.device_get(out.images))
    wall_s = time.perf_counter() - t0  # includes the one compile; experiments/bench_var_sampling.py separates them
    grid_path = save_grid(
        images,
        workdir / "grid.png",
        nrow=config.grid.per_class,
        row_labels=[f"class {c}" for c in classes],
        scale=max(1, 128 // images.shape[1]),
    )
    np.savez(
        workdir / "samples.npz",
        labels=labels,
        images=images,
        **{f"indices_s{k}": np.asarray(i) for k, i in enumerate(out.indices)},
    )
    report = {
        "grid": str(grid_path),
        "num_images": len(labels),
        "image_size": int(images.shape[1]),
        "wall_s_with_compile": round(wall_s, 3),
        "checkpoint": config.checkpoint or None,
        "device": jax.devices()[0].device_kind,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv):
    del argv
    report = sample_grid(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
