"""LPIPS perceptual distance (Zhang et al. 2018, "lpips" v0.1, VGG16 trunk) in Flax.

    d(x, y) = sum_s mean_hw( w_s . (n(f_s(x)) - n(f_s(y)))^2 ),   n(f) = f / (||f||_C + 1e-10)

where `f_s` (s = 1..5) are the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the
input shifted and scaled by ImageNet-ish constants, `||.||_C` is the L2 norm over channels at each pixel, and `w_s`
(`[C_s]`, non-negative) are the learned 1x1 "lin" heads. Images are NHWC `[B, H, W, 3]` in [-1, 1]; the result is
one float32 distance per image, `[B]`. Any H, W >= 16 works (the trunk halves them four times, flooring).

Weights: `load_lpips_params()` reads the `.npz` that `python -m jaxgen.convert lpips` writes (torchvision's
ImageNet VGG16 + the lpips package's linear heads); see docs/lpips.md. The file format (`save_lpips_npz` /
`read_lpips_npz`) lives here, with the network it feeds; the converter imports this module, never the reverse.
The param tree is

    {"vgg": {"conv1_1": {"kernel": [3, 3, 3, 64], "bias": [64]}, ..., "conv5_3": {...}},
     "lin0": {"kernel": [1, 1, 64, 1]}, ..., "lin4": {"kernel": [1, 1, 512, 1]}}

all float32. It is a frozen network: `lpips_distance` stops gradients into the params (input gradients flow).
Everything outside the VGG convs runs in float32, or in float64 when the compute dtype is float64 (with jax x64 on:
the tests use that as a float64 reference of the port).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jaxtyping import Array, Float

ENV_VAR = "JAXGEN_LPIPS_WEIGHTS"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
# VGG16 "D" layout: output channels of the 3x3 convs per stage; a 2x2 max-pool sits between stages.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS: tuple[int, ...] = tuple(stage[-1] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # the lpips ScalingLayer, per RGB channel
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class LPIPSWeightsMissing(FileNotFoundError):
    """The LPIPS weight file is not there; the message says how to make it or switch the loss off."""


class LPIPSWeightsInvalid(ValueError):
    """The LPIPS weight file does not hold exactly the expected keys and shapes; the message names each offender."""


def default_lpips_path() -> Path:
    """Where the weight file is looked for: `$JAXGEN_LPIPS_WEIGHTS` if set, else `~/.cache/jaxgen/lpips_vgg16.npz`."""
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxgen" / "lpips_vgg16.npz"


def missing_weights_message(path: str | Path) -> str:
    """The error text for a missing weight file at `path`: how to make it, and how to switch the loss off."""
    path = Path(path)
    return (
        f"The config asks for the perceptual loss (LPIPS, VGG16 + learned linear heads), but its weight file is "
        f"missing: {path}\n"
        f"Make it once (a 528 MB download; the converter needs PyTorch: pip install -e '.[torch]'):\n"
        f"    curl -L -o {VGG16_FILE} {VGG16_URL}\n"
        f"    python -m jaxgen.convert lpips --vgg16 {VGG16_FILE} --out {path}\n"
        f"(the linear heads are read from the installed lpips package: pip install --no-deps lpips==0.1.4, "
        f"or pass --lin PATH/TO/vgg.pth). Where it is looked for: tokenizer_loss.lpips_weights if the config sets it, "
        f"else ${ENV_VAR}, else ~/.cache/jaxgen/lpips_vgg16.npz.\n"
        f"Or switch the perceptual loss off: tokenizer_loss.perceptual_weight=0 "
        f"(on the command line: --config.tokenizer_loss.perceptual_weight=0)."
    )


def load_lpips_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read the converted LPIPS weights (default `default_lpips_path()`) as a nested dict of float32 jax arrays.

    Raises `LPIPSWeightsMissing` (a `FileNotFoundError`) when the file is absent, and `LPIPSWeightsInvalid` (a
    `ValueError`) when it does not hold exactly the expected keys and shapes.
    """
    path = Path(path).expanduser() if path is not None else default_lpips_path()
    if not path.is_file():
        raise LPIPSWeightsMissing(missing_weights_message(path))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), read_lpips_npz(path))


def save_lpips_npz(params: Mapping[str, Any], path: str | Path) -> Path:
    """Write the param tree to one `.npz` (keys "vgg/conv1_1/kernel", ..., float32); atomic; returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)
    return path


def read_lpips_npz(path: str | Path) -> dict[str, Any]:
    """Read a file written by `save_lpips_npz` back into the param tree (numpy float32), checking keys and shapes.

    Raises `LPIPSWeightsInvalid` naming every missing, unexpected and mis-shaped entry.
    """
    with np.load(Path(path)) as f:
        flat = {tuple(k.split("/")): np.asarray(f[k], np.float32) for k in f.files}
    expected = traverse_util.flatten_dict(lpips_param_shapes())
    missing = ["/".join(k) + f" {tuple(v.shape)}" for k, v in expected.items() if k not in flat]
    unexpected = ["/".join(k) for k in flat if k not in expected]
    misshaped = [
        f"{'/'.join(k)} {flat[k].shape} expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in flat and flat[k].shape != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        raise LPIPSWeightsInvalid(
            f"{path} is not an LPIPS weight file from `python -m jaxgen.convert lpips`: missing {missing}, "
            f"unexpected {unexpected}, mis-shaped {misshaped}; convert it again"
        )
    return traverse_util.unflatten_dict(flat)


def _outer_dtype(dtype: Any) -> Any:
    """The dtype of everything around the convs: float32, or float64 for float64 compute."""
    return jnp.promote_types(dtype, jnp.float32)


def scale_input(x: Float[Array, "B H W 3"], dtype: Any = jnp.float32) -> Float[Array, "B H W 3"]:
    """[-1, 1] RGB -> the trunk's input: `(x - shift) / scale` per channel, in `dtype` (float32 or float64)."""
    x = x.astype(dtype)
    return (x - jnp.asarray(SHIFT, dtype)) / jnp.asarray(SCALE, dtype)


def normalize_channels(
    f: Float[Array, "B H W C"], eps: float = NORM_EPS, dtype: Any = jnp.float32
) -> Float[Array, "B H W C"]:
    """Unit-normalise each pixel's channel vector: `f / (||f||_2 + eps)`, in `dtype` (float32 or float64)."""
    f = f.astype(dtype)
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class VGG16Features(nn.Module):
    """The VGG16 conv trunk up to relu5_3: `[B, H, W, 3]` -> the five taps (relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3), tap s of shape `[B, H // 2^s, W // 2^s, C_s]` (s = 0..4, C = 64, 128, 256, 512, 512), float32
    (float64 for float64 compute).

    Convs are 3x3, padding 1, computed in `dtype` (params float32); `conv{s+1}_{i+1}` is conv i of stage s.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W 3"]) -> tuple[Float[Array, "B h w C"], ...]:
        taps = []
        h = x.astype(self.dtype)
        for s, widths in enumerate(VGG16_STAGES):
            if s:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            for i, width in enumerate(widths):
                conv = nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                    name=f"conv{s + 1}_{i + 1}",
                )  # fmt: skip
                h = nn.relu(conv(h))
            taps.append(h.astype(_outer_dtype(self.dtype)))
        return tuple(taps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16): two image batches `[B, H, W, 3]` in [-1, 1] (any float dtype) -> distances `[B]` float32.

    `dtype` is the compute dtype of the VGG convs (e.g. bfloat16 inside bf16 training); the input scaling, the
    channel normalisation, the linear heads and the means are float32 (all float64, distances included, when
    `dtype` is float64 under jax x64).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W 3"], y: Float[Array, "B H W 3"]) -> Float[Array, " B"]:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS wants two [B, H, W, 3] image batches of one shape, got {x.shape} and {y.shape}")
        b, outer = x.shape[0], _outer_dtype(self.dtype)
        taps = VGG16Features(self.dtype, name="vgg")(scale_input(jnp.concatenate([x, y], axis=0), outer))
        total = jnp.zeros((b,), outer)
        for s, f in enumerate(taps):
            diff = jnp.square(normalize_channels(f[:b], dtype=outer) - normalize_channels(f[b:], dtype=outer))
            head = nn.Conv(1, (1, 1), use_bias=False, dtype=outer, param_dtype=jnp.float32, name=f"lin{s}")
            total = total + jnp.mean(head(diff), axis=(1, 2, 3))
        return total


def lpips_distance(
    params: dict[str, Any], x: Float[Array, "B H W 3"], y: Float[Array, "B H W 3"], dtype: Any = jnp.float32
) -> Float[Array, " B"]:
    """LPIPS distances `[B]` float32 between image batches `x`, `y` (`[B, H, W, 3]` in [-1, 1]).

    `params` is the tree from `load_lpips_params` (no `"params"` wrapper); it is treated as frozen: gradients
    stop at it, while gradients with respect to `x` and `y` flow. `dtype` is the conv compute dtype.
    """
    params = jax.lax.stop_gradient(params)
    return LPIPS(dtype=dtype).apply({"params": params}, x, y)


def lpips_param_shapes() -> dict[str, Any]:
    """The expected param tree as `jax.ShapeDtypeStruct`s (float32), without computing anything."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
