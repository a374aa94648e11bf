"""Training checkpoints: one Orbax CheckpointManager per stage (the whole train state and the data iterator).
The params-only checkpoints the binaries exchange (exports, converted weights) are `jaxgen.pretrained`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen.paths import as_path

# ---- Training checkpoints: one Orbax CheckpointManager per stage -------------------------------------------------


def make_manager(directory: str | Path, *, keep: int, best_metric: str | None = None) -> ocp.CheckpointManager:
    """Keeps the `keep` latest steps and, with `best_metric`, also the step where that metric was lowest. Orbax
    writes each step to a temporary directory and renames it when complete, so a run killed during a save restores
    from the previous complete step. Saves are asynchronous (see `save_train_state`); `mngr.close()` waits for the
    last one."""
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        create=True,
        enable_async_checkpointing=True,  # Orbax's default; stated because `save_train_state` relies on it
    )
    return ocp.CheckpointManager(as_path(directory), options=options)


class DamagedCheckpointError(ValueError):
    """A training checkpoint exists but cannot be read (truncated, garbled, partly deleted)."""


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def save_train_state(mngr: ocp.CheckpointManager, state: Any, data_iter: Any, metrics: dict | None = None) -> None:
    """Start saving the whole train state and the data iterator's position at `state.step`; returns once the
    arrays are on the host, while Orbax writes them in a background thread. The manager waits for a pending save
    before the next save, a restore (`restore_train_state`) and `close()`.

    Why the caller may donate `state` to the next step right away: with no `device_host_max_bytes` limit set (we set
    none), Orbax's array handler puts every array in the "prioritized" group, whose device-to-host copy
    (`replica_slices.transfer_arrays_to_host`: `copy_to_host_async` then `np.asarray`, "Blocks until completion")
    finishes before `save()` returns; `TransferPriority.SYNCHRONOUS` is documented as "never corrupted by concurrent
    updates or donations" (orbax-checkpoint 0.12, `_src/serialization/types.py`, `jax_array_handlers.py`; guide:
    https://orbax.readthedocs.io/en/stable/guides/checkpoint/async_checkpointing.html, "the blocking portion of the
    save"). On CPU that host copy can be a zero-copy view; JAX then does not donate a buffer that a view still
    references (it copies instead), so the step cannot overwrite what is being written either. The grain iterator's
    state is a small JSON that Orbax writes synchronously inside `save()` (not an async handler)."""
    save_iter, _ = _grain_args()
    step = int(jax.device_get(state.step))
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=save_iter(data_iter)),
        metrics=metrics,
        force=True,
    )


def restore_train_state(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, step: int | None = None):
    """Restore the latest (or `step`) state onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs
    with `.sharding`), and move `data_iter` to where it was. Returns the state. A checkpoint that cannot be read
    raises `DamagedCheckpointError` naming its directory and what to do."""
    _, restore_iter = _grain_args()
    mngr.wait_until_finished()
    step = mngr.latest_step() if step is None else step
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=restore_iter(data_iter)),
        )
    except Exception as e:  # Orbax / TensorStore raise many types (ValueError, OSError, JSONDecodeError, ...)
        raise damaged_checkpoint_error(mngr, step, e) from e
    return restored["state"]


def damaged_checkpoint_error(mngr: ocp.CheckpointManager, step: int, cause: BaseException) -> DamagedCheckpointError:
    """The error for an unreadable step: which directory, why (one line), and what to do."""
    directory = as_path(mngr.directory) / str(step)
    while cause.__cause__ is not None:  # Orbax wraps TensorStore's error, which says what is wrong with the file
        cause = cause.__cause__
    reason = " ".join(str(cause).split())
    reason = f"{type(cause).__name__}: {reason[:200]}{'...' if len(reason) > 200 else ''}"
    others = sorted(s for s in mngr.all_steps() if s != step)
    then = f"the run then resumes from step {others[-1]}" if others else "the stage then starts from step 0"
    return DamagedCheckpointError(
        f"checkpoint {directory} is damaged ({reason}): delete that directory ({then}) or restore it from a backup"
    )
