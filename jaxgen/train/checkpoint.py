"""Orbax checkpoints of model params with the config that built them (`DIR/params/`, `DIR/config.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


def save_pretrained(directory: str | Path, params: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write `params` (a pytree, e.g. {'vae': ..., 'var': ...}) and the JSON-able `config` under `directory`."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=list))
    return directory


def load_pretrained(directory: str | Path, expected: Any | None = None) -> tuple[dict[str, Any], Any]:
    """Read (config, params). With `expected` (a tree of shapes, e.g. from `jax.eval_shape`), every leaf's path and
    shape must match, else a ValueError lists the differences (e.g. a checkpoint of another depth)."""
    directory = Path(directory).absolute()
    if not (directory / "params").is_dir() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a jaxgen checkpoint (needs params/ and config.json); make one "
            f"with `python -m jaxgen.convert var --vae ... --var ... --out {directory}`"
        )
    config = json.loads((directory / "config.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params")
    if expected is not None:
        check_tree_shapes(params, expected, f"checkpoint {directory}")
    return config, params


def check_tree_shapes(tree: Any, expected: Any, what: str) -> None:
    """Raise ValueError naming every leaf that is missing, unexpected or of another shape."""
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = [f"{k} {got[k]} (config: {want[k]})" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if missing or unexpected or misshaped:
        parts = [
            f"{name}: {items[:8]}{' ...' if len(items) > 8 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if items
        ]
        raise ValueError(
            f"{what} does not fit the config ({'; '.join(parts)}); was it made for another model "
            f"size? Use the config it was written with (see its config.json)."
        )
