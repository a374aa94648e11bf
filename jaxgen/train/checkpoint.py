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


# ---- Training checkpoints: one Orbax CheckpointManager per stage -------------------------------------------------


def make_manager(directory: str | Path, *, keep: int, best_metric: str | None = None) -> ocp.CheckpointManager:
    """Keeps the `keep` latest steps and, with `best_metric`, also the step where that metric was lowest. Orbax
    writes each step to a temporary directory and renames it when complete, so a run killed during a save restores
    from the previous complete step."""
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def save_train_state(mngr: ocp.CheckpointManager, state: Any, data_iter: Any, metrics: dict | None = None) -> None:
    """Save the whole train state and the data iterator's position at `state.step` (blocks until written)."""
    save_iter, _ = _grain_args()
    step = int(jax.device_get(state.step))
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=save_iter(data_iter)),
        metrics=metrics,
        force=True,
    )
    mngr.wait_until_finished()


def restore_train_state(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, step: int | None = None):
    """Restore the latest (or `step`) state onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs
    with `.sharding`), and move `data_iter` to where it was. Returns the state."""
    _, restore_iter = _grain_args()
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=restore_iter(data_iter))
    )
    return restored["state"]
