"""LPIPS (VGG16) weights: torchvision's ImageNet VGG16 + the lpips package's linear heads -> one `.npz` file.

    python -m jaxgen.convert lpips --vgg16 vgg16-397923af.pth [--lin vgg.pth] [--out ~/.cache/jaxgen/lpips_vgg16.npz]

Key mapping (PyTorch -> `jaxgen.models.lpips.LPIPS` params; conv weights `[O, I, kh, kw]` -> kernels
`[kh, kw, I, O]`):

    features.{0,2 | 5,7 | 10,12,14 | 17,19,21 | 24,26,28}.{weight,bias} -> vgg/conv{1..5}_{1..3}/{kernel,bias}
    lin{0..4}.model.1.weight  [1, C, 1, 1]                               -> lin{0..4}/kernel  [1, 1, C, 1]

`classifier.*` (VGG16's fully connected head) is ignored. The `.npz` holds the flattened tree, keys "vgg/conv1_1/kernel"
etc., float32; its reader and writer (`read_lpips_npz`, `save_lpips_npz`) live with the model in `jaxgen.models.lpips`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen.convert.common import KeyMap, convert, load_state_dict
from jaxgen.models.lpips import VGG16_STAGES, VGG16_URL, default_lpips_path, lpips_param_shapes, save_lpips_npz


def vgg16_feature_indices() -> dict[int, str]:
    """torchvision `vgg16().features` index of each conv -> its name here: {0: "conv1_1", 2: "conv1_2", 5: ...}."""
    out, idx = {}, 0
    for s, widths in enumerate(VGG16_STAGES):
        for i in range(len(widths)):
            out[idx] = f"conv{s + 1}_{i + 1}"
            idx += 2  # conv, ReLU
        idx += 1  # MaxPool2d
    return out


def _rename_feature(m: re.Match) -> str:
    name = vgg16_feature_indices().get(int(m.group(1)))
    return f"vgg.{name}." if name else f"features_{m.group(1)}."  # an index with no conv stays unmatched


VGG16_KEYMAP = KeyMap(renames=((r"^features\.(\d+)\.", _rename_feature),), ignore=(r"^classifier\.",))
LIN_KEYMAP = KeyMap(renames=((r"^lin(\d+)\.model\.\d+\.", r"lin\1."),))


def default_lin_path() -> Path:
    """The installed lpips package's v0.1 VGG linear heads, found without importing lpips (that needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LPIPS linear heads come from the lpips package, which is not installed: "
            "pip install --no-deps lpips==0.1.4 (or pass --lin PATH/TO/lpips/weights/v0.1/vgg.pth)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"the lpips package has no linear heads at {path}; pass --lin PATH/TO/vgg.pth")
    return path


def convert_lpips(vgg16_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision VGG16 state_dict + lpips linear-head state_dict -> the `LPIPS` param tree (numpy float32).

    Every expected key and shape is checked; `ConversionError` names each missing, unexpected and mis-shaped one.
    """
    expected = lpips_param_shapes()
    vgg_sd = {k: np.asarray(_numpy(v)) for k, v in vgg16_state_dict.items()}
    lin_sd = {k: np.asarray(_numpy(v)) for k, v in lin_state_dict.items()}
    vgg = convert(
        vgg_sd, {"vgg": expected["vgg"]}, VGG16_KEYMAP, what="the VGG16 state_dict",
        hint=f"expected torchvision's ImageNet vgg16 ({VGG16_URL}): features.N.weight / features.N.bias",
    )  # fmt: skip
    lin = convert(
        lin_sd, {k: v for k, v in expected.items() if k != "vgg"}, LIN_KEYMAP, what="the LPIPS linear heads",
        hint="expected lpips/weights/v0.1/vgg.pth: lin0..lin4.model.1.weight of shape [1, C, 1, 1]",
    )  # fmt: skip
    return {**vgg, **lin}


def split_lpips_module_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A whole `lpips.LPIPS(net='vgg')` module state_dict -> (torchvision-style VGG16 state_dict, lin state_dict).

    `net.slice{k}.{N}.*` is torchvision's `features.{N}.*` (the slices keep the features indices); `lin{k}.*` is
    kept as is; the `lins.k` aliases of `lin{k}` and the scaling layer's constant buffers are dropped. Feed the
    pair to `convert_lpips`.
    """
    vgg, lin = {}, {}
    for key, value in state_dict.items():
        if m := re.match(r"^net\.slice\d+\.(\d+\.\w+)$", key):
            vgg[f"features.{m.group(1)}"] = value
        elif re.match(r"^lin\d+\.", key):
            lin[key] = value
        elif not key.startswith(("scaling_layer.", "lins.")):  # `lins.k` is the ModuleList alias of `lin{k}`
            vgg[key] = value  # left for convert_lpips to report as unexpected
    return vgg, lin


def convert_lpips_files(vgg16: str | Path, lin: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Read the two checkpoints (`.pth` / `.npz` / `.safetensors`), convert, write the `.npz`; returns its path.

    `lin` defaults to `default_lin_path()`, `out` to `default_lpips_path()`.
    """
    vgg_sd = load_state_dict(vgg16)
    lin_sd = load_state_dict(lin if lin is not None else default_lin_path())
    params = convert_lpips(vgg_sd, lin_sd)
    return save_lpips_npz(params, out if out is not None else default_lpips_path())


def _numpy(t: Any) -> Any:
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else t
