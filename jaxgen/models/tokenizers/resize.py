"""Image resizing that matches ``torch.nn.functional.interpolate`` on NHWC arrays.

All functions take and return channels-last arrays ``[B, H, W, C]``, keep the
input dtype, are jittable and differentiable. Along each spatial axis, with
input length ``In`` and output length ``Out``:

* ``area_resize`` == ``F.interpolate(mode='area')`` == ``F.adaptive_avg_pool2d``:
  output ``i`` is the mean of inputs ``[floor(i*In/Out), ceil((i+1)*In/Out))``.
  Windows may overlap (e.g. 4 -> 3), and ``Out > In`` (upsampling) works too.
* ``bicubic_resize`` == ``F.interpolate(mode='bicubic', align_corners=False,
  antialias=False)``: with ``scale = In/Out`` (float32, as torch), source
  ``src = scale*(i+0.5) - 0.5`` (not clamped at 0), ``i0 = floor(src)``,
  ``t = src - i0``; taps ``i0-1 .. i0+2`` use Keys cubic convolution with
  ``A = -0.75`` and are clamped to ``[0, In-1]``, so out-of-range taps add
  their weight onto the edge pixel. (``jax.image.resize(..., 'cubic')`` uses
  ``A = -0.5`` and half-pixel edge handling, so it differs.) The weights are
  bit-identical to torch's CPU kernel, whose float32 rounding depends on its
  CPU dispatch (FMA or not, see ``bicubic_weights``).
* ``nearest_upsample_2x`` == ``F.interpolate(scale_factor=2, mode='nearest')``.
* ``bilinear_resize`` == ``F.interpolate(mode='bilinear', align_corners=False)``
  (``half_pixel=True``: ``src = max(scale*(i+0.5) - 0.5, 0)``) or TensorFlow 1's
  legacy ``ResizeBilinear(align_corners=False, half_pixel_centers=False)``
  (``half_pixel=False``: ``src = scale*i``), which the ADM FID evaluator's
  Inception graph applies; taps ``floor(src)`` and the next, clamped to
  ``In-1``. Neither antialiases (``jax.image.resize`` does when downsampling).

Area and bicubic resizes are separable: a dense ``[Out, In]`` weight matrix per
axis (built once in numpy and cached) is contracted with ``jnp.einsum`` at
``Precision.HIGHEST``. Shapes are static, no gathers are used. Results match
torch to float32 rounding (summation order differs; the weights do not).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75  # Keys cubic convolution coefficient used by PyTorch.


@functools.cache
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive-average-pool weights ``[Out, In]`` (float32); rows sum to 1."""
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -(-((i + 1) * n_in) // n_out)  # ceil division
        w[i, start:end] = 1.0 / (end - start)
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``a*b + c`` with one rounding, emulated exactly in float64."""
    p, c = np.asarray(a, np.float64) * np.asarray(b, np.float64), np.asarray(c, np.float64)  # p exact
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)  # TwoSum: p + c == s + err exactly
    # Round to odd in float64, then one rounding to float32 is correctly rounded (53 >= 24 + 2).
    nb = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
    return np.where((err == 0) | (s.view(np.int64) & 1 == 1), s, nb).astype(np.float32)


@functools.cache
def bicubic_weights(n_in: int, n_out: int, fused: bool = True) -> np.ndarray:
    """Torch bicubic (``align_corners=False``) weights ``[Out, In]`` (float32).

    Equal bit for bit to torch's CPU output on one-hot inputs: source coordinates
    and tap coefficients are computed in float32 with torch's formulas, and
    clamped taps are summed in float32 in tap order. torch's vectorised
    (AVX2/AVX512) CPU kernels are compiled with fused multiply-adds in
    ``scale*(i+0.5) - 0.5`` and the two inner steps of each cubic (``fused=True``,
    emulated exactly); its ``ATEN_CPU_CAPABILITY=default`` kernel has none
    (``fused=False``). The two differ by about one float32 ulp of the coordinate.
    """
    f32 = np.float32
    mad = _fma if fused else (lambda a, b, c: f32(a) * b + f32(c))  # a*b + c
    a = f32(_A)

    def near(x):  # |x| <= 1: ((A+2)x - (A+3)) x^2 + 1
        return mad(a + f32(2), x, -(a + f32(3))) * x * x + f32(1)

    def far(x):  # 1 <= |x| <= 2: ((Ax - 5A) x + 8A) x - 4A
        return mad(mad(a, x, f32(-5) * a), x, f32(8) * a) * x - f32(4) * a

    scale = f32(n_in) / f32(n_out)
    src = mad(scale, np.arange(n_out, dtype=f32) + f32(0.5), f32(-0.5))
    i0 = np.minimum(np.floor(src), f32(n_in - 1))
    t = np.clip(src - i0, f32(0), f32(1))
    u = f32(1) - t
    coeffs = [far(t + f32(1)), near(t), near(u), far(u + f32(1))]
    w = np.zeros((n_out, n_in), f32)
    rows = np.arange(n_out)
    for k, c in enumerate(coeffs):  # taps i0-1 .. i0+2, clamped onto the edges
        np.add.at(w, (rows, np.clip(i0.astype(np.int64) + k - 1, 0, n_in - 1)), c.astype(f32))
    w.flags.writeable = False
    return w


@functools.cache
def bilinear_weights(n_in: int, n_out: int, half_pixel: bool = True) -> np.ndarray:
    """Bilinear weights ``[Out, In]`` (float32, two taps a row) with the coordinates computed in float32 as
    torch (``half_pixel=True``) or TensorFlow 1's legacy resize (``half_pixel=False``) compute them."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    i = np.arange(n_out, dtype=f32)
    src = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0)) if half_pixel else scale * i
    lo = np.minimum(np.floor(src), f32(n_in - 1))
    frac = (src - lo).astype(f32)
    lo = lo.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in), f32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), f32(1) - frac)
    np.add.at(w, (rows, hi), frac)
    w.flags.writeable = False
    return w


def _check(x: jax.Array, size: tuple[int, int] | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected x of shape [B, H, W, C], got shape {x.shape}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"input spatial size must be positive, got {x.shape[1:3]}")
    if size is not None:
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"size must be two positive ints (h, w), got {size!r}")


def _separable(x: jax.Array, wh: np.ndarray, ww: np.ndarray) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(wh, x.dtype), x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(ww, x.dtype), x, precision=hp)


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Torch ``mode='area'`` resize: ``[B, H, W, C]`` -> ``[B, h, w, C]``, ``size=(h, w)``."""
    _check(x, size)
    (_, H, W, _), (h, w) = x.shape, size
    return _separable(x, area_weights(H, int(h)), area_weights(W, int(w)))


def bicubic_resize(x: jax.Array, size: tuple[int, int], *, fused: bool = True) -> jax.Array:
    """Torch ``mode='bicubic'``, ``align_corners=False`` resize: ``[B, H, W, C]`` -> ``[B, h, w, C]``.

    No antialiasing (torch's default), so downsampling aliases exactly like torch.
    Output values may overshoot the input range (cubic ringing); no clamping.
    ``fused``: see ``bicubic_weights`` (True matches torch on AVX2/AVX512 CPUs).
    """
    _check(x, size)
    (_, H, W, _), (h, w) = x.shape, size
    return _separable(x, bicubic_weights(H, int(h), fused), bicubic_weights(W, int(w), fused))


def bilinear_resize(x: jax.Array, size: tuple[int, int], *, half_pixel: bool = True) -> jax.Array:
    """Bilinear resize ``[B, H, W, C]`` -> ``[B, h, w, C]`` without antialiasing; ``half_pixel``: see
    ``bilinear_weights`` (True: torch ``align_corners=False``; False: TF1 legacy, as the ADM evaluator)."""
    _check(x, size)
    (_, H, W, _), (h, w) = x.shape, size
    return _separable(x, bilinear_weights(H, int(h), half_pixel), bilinear_weights(W, int(w), half_pixel))


def nearest_upsample_2x(x: jax.Array) -> jax.Array:
    """Torch ``scale_factor=2, mode='nearest'``: ``[B, H, W, C]`` -> ``[B, 2H, 2W, C]``."""
    _check(x)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """TF-style 2x2 average pool with stride 2 and 'SAME' padding: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), C]`;
    the padding cells of an odd edge are not counted in the mean (Flax's `avg_pool` counts them)."""
    _check(x)
    window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
    # a Python 0.0 init makes this the differentiable windowed sum (an array init is a generic reduce_window)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, window, strides, "SAME")
    return total / count
