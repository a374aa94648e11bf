"""Shared machinery of the checkpoint converters: load a PyTorch state_dict as numpy, map its keys onto a Flax param
tree, and check every key and shape.

Key mapping is mechanical once a family's renames are applied: `down.0.block.1.conv1.weight` ->
`('down_0', 'block_1', 'conv1', 'kernel')`. A `weight` becomes `kernel` (Dense / Conv, transposed to Flax layout),
`scale` (norms) or `embedding` (embeddings), whichever the target tree has. The plan is built from shapes alone, so
the released multi-billion-parameter key lists can be checked without allocating them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

Path_ = tuple[str, ...]
WRAPPER_KEYS = ("model", "module", "state_dict", "ema")


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """How one family's PyTorch names map onto its Flax tree."""

    renames: tuple[tuple[str, Any], ...] = ()  # (regex, replacement str or callable) applied in order to the key
    ignore: tuple[str, ...] = ()  # regexes of keys that are buffers / statistics with no Flax parameter


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned tensor move: PyTorch `key` -> Flax `path`, with `transform` in {copy, conv, linear, reshape}."""

    key: str
    path: Path_
    transform: str
    shape: tuple[int, ...]  # the Flax shape


def nchw(x) -> np.ndarray:
    """NHWC -> NCHW (PyTorch's layout), as numpy."""
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ---- loading --------------------------------------------------------------------------------------------------------
def unwrap_state_dict(obj: Any, wrappers: Iterable[str] = WRAPPER_KEYS) -> dict[str, Any]:
    """Strip the wrapper dicts training scripts save around a state_dict (`{'model': sd}`, ...)."""
    wrappers = tuple(wrappers)
    while isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
        hits = [k for k in wrappers if k in obj]
        if not hits:
            raise ConversionError(
                f"unknown checkpoint wrapper with keys {sorted(obj)[:10]}: expected a state_dict (name -> tensor) or "
                f"one wrapped under {list(wrappers)}; extract the state_dict and save it with torch.save"
            )
        obj = obj[hits[0]]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def _looks_like_state_dict(d: Mapping) -> bool:
    return bool(d) and all(hasattr(v, "shape") for v in d.values())


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch.Tensor; bfloat16 has no numpy dtype
        t = t.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def load_state_dict(path: str | Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Read a state_dict from `.pth`/`.pt`/`.bin`/`.ckpt` (needs torch), `.npz` or `.safetensors` as numpy arrays.

    With `prefix`, only keys starting with it are kept, prefix removed (the fixtures store `vae/...`, `var/...`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as f:
            sd = {k: f[k] for k in f.files}
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        sd = load_file(str(path))
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(
                f"reading {path.name} needs PyTorch: pip install -e '.[torch]' "
                f"(or convert the file to .npz / .safetensors first)"
            ) from e
        sd = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        raise ConversionError(f"unsupported checkpoint format {suffix!r} ({path}); use .pth, .npz or .safetensors")
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ConversionError(f"{path} has no keys under prefix {prefix!r}")
    return sd


# ---- planning -------------------------------------------------------------------------------------------------------
def torch_key_to_path(key: str, keymap: KeyMap) -> Path_:
    """Dotted PyTorch key -> Flax path; a numeric segment joins the one before (`blocks.3` -> `blocks_3`)."""
    for pattern, repl in keymap.renames:
        key = re.sub(pattern, repl, key)
    out: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


def _nonunit(shape) -> list[int]:
    return [int(d) for d in shape if d != 1]


def _plan_one(key: str, shape: tuple[int, ...], path: Path_, expected: Mapping[Path_, Any]) -> Step | str:
    """Pick the target leaf and transform for one tensor; return an error string when it does not fit."""
    if path[-1] == "weight":
        for leaf in ("kernel", "scale", "embedding"):
            if (*path[:-1], leaf) in expected:
                path = (*path[:-1], leaf)
                break
    if path not in expected:
        return "unexpected"
    want = tuple(int(d) for d in expected[path].shape)
    if path[-1] == "kernel" and len(shape) == 4:
        transform, got = "conv", (shape[2], shape[3], shape[1], shape[0])  # (O, I, kh, kw) -> (kh, kw, I, O)
    elif path[-1] == "kernel" and len(shape) == 2:
        transform, got = "linear", (shape[1], shape[0])  # (out, in) -> (in, out)
    elif tuple(shape) == want:
        transform, got = "copy", want
    elif _nonunit(shape) == _nonunit(want):  # e.g. pos_start (1, 1, C) -> (1, C), scale_mul_1H11 (1, H, 1, 1) -> (H,)
        transform, got = "reshape", want
    else:
        transform, got = "copy", tuple(shape)
    if got != want:
        return f"{key} {tuple(shape)} -> {'/'.join(path)} expects {want}"
    return Step(key, path, transform, want)


def plan_conversion(
    shapes: Mapping[str, tuple[int, ...]], expected_tree: Any, keymap: KeyMap, what: str = "checkpoint", hint: str = ""
) -> list[Step]:
    """Match every PyTorch key (by shape only) to a leaf of `expected_tree` (e.g. from `jax.eval_shape`).

    Raises `ConversionError` naming every missing, unexpected and mis-shaped key.
    """
    expected = traverse_util.flatten_dict(_unfreeze(expected_tree))
    steps, unexpected, misshaped = [], [], []
    for key, shape in shapes.items():
        if any(re.search(p, key) for p in keymap.ignore):
            continue
        res = _plan_one(key, tuple(int(d) for d in shape), torch_key_to_path(key, keymap), expected)
        if isinstance(res, Step):
            steps.append(res)
        elif res == "unexpected":
            unexpected.append(f"{key} {tuple(shape)}")
        else:
            misshaped.append(res)
    covered = {s.path for s in steps}
    missing = ["/".join(p) + f" {tuple(expected[p].shape)}" for p in expected if p not in covered]
    if missing or unexpected or misshaped:
        raise ConversionError(_report(what, missing, unexpected, misshaped, hint))
    return steps


def _report(what, missing, unexpected, misshaped, hint, limit: int = 12) -> str:
    lines = [f"{what} does not match the model config:"]
    for name, items in (
        ("missing (the config has them, the checkpoint does not)", missing),
        ("unexpected (in the checkpoint, not in the config)", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {len(items)} {name}: " + "; ".join(items[:limit]) + more)
    if hint:
        lines.append("  " + hint)
    return "\n".join(lines)


_TRANSFORMS: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    "copy": lambda a, s: a,
    "conv": lambda a, s: np.transpose(a, (2, 3, 1, 0)),
    "linear": lambda a, s: a.T,
    "reshape": lambda a, s: a.reshape(s),
}


def apply_plan(steps: list[Step], state_dict: Mapping[str, np.ndarray], dtype=np.float32) -> dict:
    """Build the nested Flax param dict from a plan and the tensors."""
    flat = {}
    for s in steps:
        arr = _TRANSFORMS[s.transform](np.asarray(state_dict[s.key]), s.shape)
        flat[s.path] = np.ascontiguousarray(arr, dtype=dtype if np.issubdtype(arr.dtype, np.floating) else None)
    return traverse_util.unflatten_dict(flat)


def convert(
    state_dict: Mapping[str, np.ndarray], expected_tree: Any, keymap: KeyMap, what: str = "checkpoint", hint: str = ""
) -> dict:
    """`plan_conversion` + `apply_plan`."""
    steps = plan_conversion({k: v.shape for k, v in state_dict.items()}, expected_tree, keymap, what, hint)
    return apply_plan(steps, state_dict)


def count_params(tree: Any) -> int:
    flat = traverse_util.flatten_dict(_unfreeze(tree))
    return int(sum(int(np.prod(v.shape)) for v in flat.values()))


def _unfreeze(tree: Any) -> Any:
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return dict(tree) if isinstance(tree, Mapping) else tree
