"""Vector quantizers. `MultiScaleResidualQuantizer` is VAR's residual quantizer over a pyramid of scales.

Feature maps are NHWC `[B, h, w, C]`; per-scale token ids are `[B, p*p]` int32, flattened row-major.
Codebooks `[V, C]` carry the logical axes ('codebook', 'latent') (see `jaxgen.parallel.rules`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.layers import logical
from jaxgen.models.tokenizers.convnets import conv
from jaxgen.models.tokenizers.resize import area_resize, bicubic_resize

HIGHEST = jax.lax.Precision.HIGHEST


def phi_schedule(num_phis: int, num_scales: int) -> tuple[int, ...]:
    """Which Phi conv each scale uses: the one whose tick is nearest to k / (S - 1).

    Ticks are linspace(1/(3K), 1 - 1/(3K), K) for K = 4 and linspace(1/(2K), 1 - 1/(2K), K) otherwise; computed in
    float64 like upstream, so ties decided by rounding come out the same (released 10 scales: 0,0,1,1,1,2,2,3,3,3).
    """
    if num_phis <= 1:
        return (0,) * num_scales
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    at = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return tuple(int(np.argmin(np.abs(ticks - a))) for a in at)


def codebook_init(key, shape, dtype=jnp.float32):
    """Uniform in [-1/V, 1/V], VAR's default codebook init."""
    return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


CODEBOOK_INIT = logical(codebook_init, ("codebook", "latent"))


class MultiScaleResidualQuantizer(nn.Module):
    """Residual quantisation of `f [B, P, P, C]` (P = patch_nums[-1]) into one token map per scale.

    For scale k with side p: z = area(f_rest, p) (f_rest itself at the last scale); idx = nearest code;
    h = Phi_k(bicubic(codes, P)) (no resize at the last scale); f_hat += h; f_rest -= h.
    Phi(h) = (1 - r) h + r conv3x3(h), with `share_quant_resi` convs shared over the scales (0: one per scale).
    """

    vocab_size: int
    z_channels: int
    patch_nums: Sequence[int]
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    using_znorm: bool = False
    beta: float = 0.25

    @property
    def num_phis(self) -> int:
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or len(self.patch_nums)
        return self.share_quant_resi

    def setup(self):
        self.embedding = nn.Embed(self.vocab_size, self.z_channels, embedding_init=CODEBOOK_INIT)
        self.phi = [conv(self.z_channels, 3) for _ in range(self.num_phis)]
        self.phi_index = phi_schedule(self.num_phis, len(self.patch_nums))

    # ---- building blocks -------------------------------------------------------------------------------------
    def apply_phi(self, h_bhwc: jax.Array, si: int) -> jax.Array:
        """Phi for scale `si` (identity when quant_resi is 0)."""
        if self.num_phis == 0:
            return h_bhwc
        r = abs(self.quant_resi)
        return h_bhwc * (1 - r) + self.phi[self.phi_index[si]](h_bhwc) * r

    def lookup(self, z_bhwc: jax.Array) -> jax.Array:
        """Nearest code per position: `[B, h, w, C] -> [B, h*w]` int32 (first index wins ties)."""
        b, h, w, c = z_bhwc.shape
        z = z_bhwc.reshape(b * h * w, c).astype(jnp.float32)
        e = self.embedding.embedding.astype(jnp.float32)
        if self.using_znorm:
            zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
            idx = jnp.argmax(jnp.dot(zn, en.T, precision=HIGHEST), axis=-1)
        else:
            d = jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1)
            d = d - 2.0 * jnp.dot(z, e.T, precision=HIGHEST)
            idx = jnp.argmin(d, axis=-1)
        return jax.lax.stop_gradient(idx.reshape(b, h * w).astype(jnp.int32))

    def codes(self, idx_bl: jax.Array) -> jax.Array:
        """Token ids `[B, p*p]` -> code map `[B, p, p, C]`."""
        b, n = idx_bl.shape
        p = round(n**0.5)
        return self.embedding(idx_bl).reshape(b, p, p, self.z_channels)

    def scale_residual(self, h_bhwc: jax.Array, si: int) -> jax.Array:
        """The contribution of scale `si` to f_hat: Phi(bicubic(h, P)) (no resize at the last scale)."""
        big = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_bhwc = bicubic_resize(h_bhwc, (big, big))
        return self.apply_phi(h_bhwc, si)

    # ---- tokenizer API -------------------------------------------------------------------------------------
    def quantize(self, f_bhwc: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """`f [B, P, P, C]` -> (per-scale ids `[B, p*p]`, cumulative f_hat after each scale `[B, P, P, C]`)."""
        big = self.patch_nums[-1]
        if f_bhwc.shape[1:3] != (big, big):
            raise ValueError(f"quantizer expects a {big}x{big} latent (patch_nums[-1]), got {f_bhwc.shape[1:3]}")
        f_rest = jax.lax.stop_gradient(f_bhwc.astype(jnp.float32))
        f_hat = jnp.zeros_like(f_rest)
        indices, f_hats = [], []
        last = len(self.patch_nums) - 1
        for si, p in enumerate(self.patch_nums):
            z = area_resize(f_rest, (p, p)) if si != last else f_rest
            idx = self.lookup(z)
            h = self.scale_residual(self.codes(idx), si)
            f_hat = f_hat + h
            f_rest = f_rest - h
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
        """Per-scale ids -> f_hat `[B, P, P, C]` (sum of the scales' residuals)."""
        self._check_scales(indices)
        f_hat = 0.0
        for si, idx in enumerate(indices):
            f_hat = f_hat + self.scale_residual(self.codes(idx), si)
        return f_hat

    def teacher_forcing_input(self, indices: Sequence[jax.Array]) -> jax.Array:
        """VAR's teacher-forcing input: for k < S-1, area(f_hat_k, p_{k+1}) flattened -> `[B, L - p_0^2, C]`."""
        self._check_scales(indices, need=len(self.patch_nums) - 1)
        f_hat, inputs = 0.0, []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_residual(self.codes(indices[si]), si)
            nxt = self.patch_nums[si + 1]
            x = area_resize(f_hat, (nxt, nxt))
            inputs.append(x.reshape(x.shape[0], nxt * nxt, self.z_channels))
        return jnp.concatenate(inputs, axis=1)

    def next_autoregressive_input(self, si: int, f_hat: jax.Array, h_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sampling step: add scale `si`'s codes `[B, p, p, C]` to f_hat; return (f_hat, next scale's input map)."""
        f_hat = f_hat + self.scale_residual(h_bhwc, si)
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        nxt = self.patch_nums[si + 1]
        return f_hat, area_resize(f_hat, (nxt, nxt))

    def __call__(self, f_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """Training forward: (straight-through f_hat `[B, P, P, C]`, VQ loss scalar, per-scale ids).

        The loss is mean over scales of beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2, as in VAR.
        """
        f32 = f_bhwc.astype(jnp.float32)
        indices, f_hats = self.quantize(f32)  # f_hats carry gradients to the codebook and the Phi convs
        loss = sum(
            self.beta * jnp.mean((jax.lax.stop_gradient(fh) - f32) ** 2)
            + jnp.mean((fh - jax.lax.stop_gradient(f32)) ** 2)
            for fh in f_hats
        ) / len(f_hats)
        f_hat_st = jax.lax.stop_gradient(f_hats[-1] - f32) + f32
        return f_hat_st.astype(f_bhwc.dtype), loss, indices

    def _check_scales(self, indices: Sequence[jax.Array], need: int | None = None) -> None:
        want = [p * p for p in self.patch_nums]
        got = [int(i.shape[-1]) for i in indices]
        need = len(want) if need is None else need
        if len(got) < need or got[: len(want)] != want[: len(got)]:
            raise ValueError(
                f"token maps per scale have lengths {got}; patch_nums {tuple(self.patch_nums)} "
                f"need {want[:need]} (one [B, p*p] array per scale)"
            )


class VectorQuantizer(nn.Module):
    """Single-scale VQ with an optionally L2-normalised codebook (LlamaGen / ViT-VQGAN style).

    With `l2_norm`, z and the codes are unit vectors and the lookup is the nearest code by cosine; the output is the
    (normalised) code vector with the straight-through estimator z + sg(e - z).
    """

    codebook_size: int
    embed_dim: int
    l2_norm: bool = True
    beta: float = 0.25  # commitment weight

    def setup(self):
        self.embedding = nn.Embed(self.codebook_size, self.embed_dim, embedding_init=CODEBOOK_INIT)

    def codebook(self) -> jax.Array:
        """The code vectors as used `[V, C]` (unit-norm with `l2_norm`)."""
        e = self.embedding.embedding.astype(jnp.float32)
        return _normalize(e) if self.l2_norm else e

    def lookup(self, z_bhwc: jax.Array) -> jax.Array:
        """Nearest code per position `[B, h, w, C] -> [B, h*w]` int32 (first index wins ties)."""
        b, h, w, c = z_bhwc.shape
        z = z_bhwc.reshape(b * h * w, c).astype(jnp.float32)
        z = _normalize(z) if self.l2_norm else z
        e = self.codebook()
        d = jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1) - 2.0 * jnp.dot(z, e.T, precision=HIGHEST)
        return jax.lax.stop_gradient(jnp.argmin(d, axis=-1).reshape(b, h * w).astype(jnp.int32))

    def codes(self, idx_bl: jax.Array, hw: tuple[int, int]) -> jax.Array:
        """Token ids `[B, h*w]` -> code map `[B, h, w, C]`."""
        return self.codebook()[idx_bl].reshape(idx_bl.shape[0], *hw, self.embed_dim)

    def __call__(self, z_bhwc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(quantised `[B, h, w, C]` with straight-through gradients, codebook + commitment loss, ids `[B, h*w]`)."""
        z = z_bhwc.astype(jnp.float32)
        z = _normalize(z) if self.l2_norm else z
        idx = self.lookup(z_bhwc)
        e = self.codes(idx, z.shape[1:3])
        loss = jnp.mean((e - jax.lax.stop_gradient(z)) ** 2) + self.beta * jnp.mean((jax.lax.stop_gradient(e) - z) ** 2)
        return z + jax.lax.stop_gradient(e - z), loss, idx


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|_2, eps) over the last axis (torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
