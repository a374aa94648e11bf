"""Per-image reconstruction metrics for NHWC image batches `[B, H, W, C]` (default range [-1, 1]): PSNR and SSIM.

Both return one value per image, `[B]` float32; averaging over a batch or a dataset is the caller's job.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WIN = 11  # gaussian window side: 2 * int(truncate 3.5 * sigma 1.5 + 0.5) + 1, as scikit-image / scipy build it
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array, fn: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{fn}: expected two [B, H, W, C] arrays of the same shape, got {x.shape} and {y.shape}")


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range^2 / MSE), the MSE over (H, W, C).

    `x`, `y`: `[B, H, W, C]`; `data_range`: max - min of the pixel scale (2 for [-1, 1], 255 for uint8 values).
    Returns `[B]` float32 (+inf for identical images)."""
    _check_pair(x, y, "psnr")
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(np.float32(data_range) ** 2 / mse)


def _gaussian_window() -> np.ndarray:
    """Normalised 2D gaussian `[11, 11]` float32 (sigma 1.5), the outer product of scipy's 1D gaussian kernel."""
    r = SSIM_WIN // 2
    g = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / SSIM_SIGMA) ** 2)
    g /= g.sum()
    return np.outer(g, g).astype(np.float32)


def _filter_valid(maps: jax.Array) -> jax.Array:
    """Gaussian-weighted local means of each channel, 'valid' positions only: `[B, H, W, K]` -> `[B, H-10, W-10, K]`."""
    k = maps.shape[-1]
    window = jnp.asarray(np.tile(_gaussian_window()[:, :, None, None], (1, 1, 1, k)))  # HWIO, depthwise
    return jax.lax.conv_general_dilated(
        maps,
        window,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=k,
        precision=jax.lax.Precision.HIGHEST,
    )


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Structural similarity per image (Wang et al. 2004), unitless in [-1, 1]: `[B, H, W, C]` x2 -> `[B]` float32.

    Gaussian window 11x11 (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) covariances, SSIM map over the
    'valid' window positions only, averaged over those positions and the channels. Matches
    `skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)` per image. Images need H, W >= 11 (ValueError otherwise).
    """
    _check_pair(x, y, "ssim")
    h, w = x.shape[1:3]
    if h < SSIM_WIN or w < SSIM_WIN:
        raise ValueError(f"ssim: images must be at least {SSIM_WIN}x{SSIM_WIN} px (the gaussian window), got {h}x{w}")
    c = x.shape[-1]
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    mu = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1))
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = (mu[..., i * c : (i + 1) * c] for i in range(5))
    var_x = mu_xx - mu_x * mu_x
    var_y = mu_yy - mu_y * mu_y
    cov_xy = mu_xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))
