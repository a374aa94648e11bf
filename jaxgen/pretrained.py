"""Params-only checkpoints with the config that built them: `DIR/params/` (Orbax) and `DIR/config.json`.

What the binaries exchange: `python -m jaxgen.convert` writes one from the official weights, a training run exports
one per stage (`WORKDIR/tokenizer/export`, `WORKDIR/generator/export`: EMA params), and `jaxgen.sample` /
generator-only training read them. `config.json` holds `family` and the model sections, so a checkpoint of another
family or size is refused with a message that says which config it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxgen.models.layer_stack import match_layout
from jaxgen.paths import as_path


def save_pretrained(directory: str | Path, params: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write `params` (a pytree, e.g. {'vae': ..., 'var': ...}) and the JSON-able `config` under `directory`.

    Call it from every process: params may be jax Arrays sharded over a multi-host mesh, which Orbax writes
    shard by shard from the hosts that hold them (no host gathers the whole tree); config.json is written by
    process 0 once the params are complete."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    if jax.process_index() == 0:
        (directory / "config.json").write_text(json.dumps(config, indent=1, default=list))
    return directory


def _last_stage_export(workdir: Path, first: Path) -> Path:
    """The export of the workdir's last trained generator stage (HMAR's "mask" after its "generator")."""
    from jaxgen.families import FAMILIES

    family = FAMILIES.get(json.loads((first / "config.json").read_text()).get("family"))
    names = [s.name for s in family.generator_stages()] if family else ["generator"]
    done = [workdir / n / "export" for n in names if (workdir / n / "export" / "config.json").is_file()]
    return done[-1] if done else first


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (params/ + config.json), or a training workdir: the export of its last trained
    generator stage."""
    path = as_path(path)
    if (path / "config.json").is_file():
        return path
    export = path / "generator" / "export"
    if (export / "config.json").is_file():
        return _last_stage_export(path, export)
    if (path / "tokenizer" / "export" / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds a trained tokenizer but no trained generator yet ({export} is missing): finish the "
            f"generator stage (rerun jaxgen.main with this workdir), or point at a converted checkpoint"
        )
    raise FileNotFoundError(
        f"{path} is not a jaxgen checkpoint (needs params/ and config.json) nor a training workdir with "
        f"generator/export/; make one with `python -m jaxgen.convert ...` or `python -m jaxgen.main ...`"
    )


def _section_diffs(written: dict, sections: dict) -> list[str]:
    """`key.field: checkpoint value (config: value)` for the model fields a checkpoint's config.json and a run's
    sections disagree on (compute-only fields like dtype / attn_backend left out)."""
    diffs = []
    for key, section in sections.items():
        old = written.get(key)
        if not isinstance(old, dict):
            continue
        for field in sorted(set(old) & set(section)):
            a, b = old[field], section[field]
            if field not in ("dtype", "attn_backend") and json.dumps(a, default=list) != json.dumps(b, default=list):
                diffs.append(f"{key}.{field}: {a} (config: {b})")
    return diffs


def load_pretrained(
    directory: str | Path,
    expected: Any | None = None,
    *,
    family: str | None = None,
    sections: dict[str, dict] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Read (config, params) from a checkpoint directory or a training workdir (`resolve_checkpoint`).

    With `family`, a checkpoint of another family is refused ("this is a llamagen checkpoint; use
    configs/llamagen_*.py"). With `expected` (a tree of shapes, e.g. from `jax.eval_shape`), every leaf's path and
    shape must match, else a ValueError lists the differences (e.g. a checkpoint of another depth), and with
    `sections` ({config key: model section}) the size fields its config.json has otherwise. A damaged checkpoint is
    a ValueError that names it."""
    directory = resolve_checkpoint(directory)
    if not (directory / "params").is_dir():
        raise FileNotFoundError(f"{directory} has a config.json but no params/: the checkpoint is incomplete")
    try:
        config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {directory}: config.json is damaged ({e}); re-create the checkpoint") from None
    written_by = config.get("family")
    if family is not None and written_by not in (None, family):
        raise ValueError(
            f"{directory} is a {written_by} checkpoint, but the config is family {family!r}; use "
            f"configs/{written_by}_*.py (or the config it was trained with)"
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / "params")
    except Exception as e:  # Orbax / TensorStore raise many types for truncated or garbled files
        reason = " ".join(str(e).split())[:200]
        raise ValueError(
            f"checkpoint {directory} is damaged ({type(e).__name__}: {reason}); re-create it (convert or export "
            f"again) or restore it from a backup"
        ) from e
    if expected is not None:
        params = match_layout(params, expected)  # unrolled blocks_0.. <-> scanned blocks, as the config runs them
        try:
            check_tree_shapes(params, expected, f"checkpoint {directory}")
        except ValueError as e:
            diffs = _section_diffs(config, sections or {})
            if not diffs:
                raise
            raise ValueError(f"{e} Its config.json differs from this config in {'; '.join(diffs[:6])}.") from None
    return config, params


def check_tree_shapes(tree: Any, expected: Any, what: str) -> None:
    """Raise ValueError naming every leaf that is missing, unexpected or of another shape."""
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
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
