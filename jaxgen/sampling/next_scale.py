"""Class-conditional VAR sampling: all scales in one jitted function (the scale loop unrolls at trace time).

Per scale k: the batch runs doubled ([cond; null]) through the transformer with a KV cache, guided logits
(1 + t) cond - t null with VAR's ramp t = cfg * k / (S - 1), temperature / top-k / top-p, a draw (or the Gumbel
"more smooth" soft codes), then f_hat += Phi(bicubic(codes)) and the next scale's input is area(f_hat).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxgen.models.generators.next_scale import NextScaleTransformer
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.cfg import guide, var_ramp
from jaxgen.sampling.common import ClassConditionalSampler
from jaxgen.sampling.filters import filter_logits, gumbel_softmax, sample_categorical


@dataclasses.dataclass(frozen=True)
class NextScaleSampling:
    """Sampling settings (defaults: VAR's demo)."""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    temperature: float = 1.0
    more_smooth: bool = False  # Gumbel-softmax soft codes; for visualisation, not for FID
    return_logits: bool = False  # also return the raw head logits of every scale (memory: 2B x L x V floats)


@flax.struct.dataclass
class NextScaleSample:
    indices: tuple[jax.Array, ...]  # per scale: int32 [B, p_k^2]
    f_hat: jax.Array  # float32 [B, P, P, Cvae], the decoder's input (before post_quant_conv)
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output (not clamped)
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    head_logits: tuple[jax.Array, ...] | None = None  # per scale: float32 [2B, p_k^2, V] (rows B.. are null class)

    def token_arrays(self) -> dict[str, jax.Array]:
        """The tokens by name, for saving: indices_s0, indices_s1, ..."""
        return {f"indices_s{k}": i for k, i in enumerate(self.indices)}


def sample_next_scale(
    var: NextScaleTransformer,
    vae: MultiScaleVQVAE,
    settings: NextScaleSampling,
    var_params,
    vae_params,
    labels_b: Int[Array, " B"],
    key: jax.Array,
) -> NextScaleSample:
    """The whole generation for labels `[B]` (traceable; `NextScaleSampler` jits it)."""
    c = var.config
    num_scales = len(c.patch_nums)
    b = labels_b.shape[0]
    labels2 = jnp.concatenate([labels_b, jnp.full_like(labels_b, c.num_classes)])
    var_apply = lambda method, *a: var.apply({"params": var_params}, *a, method=method)
    vae_apply = lambda method, *a: vae.apply({"params": vae_params}, *a, method=method)

    cond = var_apply(NextScaleTransformer.cond_embed, labels2)  # [2B, C]
    x = var_apply(NextScaleTransformer.first_tokens, cond)  # [2B, first_l, C]
    codebook = vae_apply(MultiScaleVQVAE.codebook)  # [V, Cvae]
    big = c.patch_nums[-1]
    f_hat = jnp.zeros((b, big, big, c.z_channels), jnp.float32)
    caches, indices, head_logits = None, [], []
    for si, pn in enumerate(c.patch_nums):
        logits, caches = var_apply(NextScaleTransformer.decode_scale, x, cond, caches)  # [2B, pn^2, V]
        if settings.return_logits:
            head_logits.append(logits)
        guided = guide(logits[:b], logits[b:], var_ramp(settings.cfg, si, num_scales))
        guided = filter_logits(guided, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        key, draw_key, gumbel_key = jax.random.split(key, 3)
        idx = sample_categorical(draw_key, guided)  # [B, pn^2]
        indices.append(idx)
        if settings.more_smooth:
            ratio = si / max(num_scales - 1, 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            codes = gumbel_softmax(gumbel_key, guided * (1 + ratio), tau) @ codebook
        else:
            codes = codebook[idx]
        codes = codes.reshape(b, pn, pn, c.z_channels)
        f_hat, next_map = vae_apply(MultiScaleVQVAE.next_autoregressive_input, si, f_hat, codes)
        if si != num_scales - 1:
            nxt = c.patch_nums[si + 1]
            x = var_apply(NextScaleTransformer.embed_scale, next_map.reshape(b, nxt * nxt, c.z_channels), si + 1)
            x = jnp.concatenate([x, x], axis=0)  # [cond; null] share the next-scale input
    decoded = vae_apply(MultiScaleVQVAE.fhat_to_img, f_hat)
    images = (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0
    return NextScaleSample(
        tuple(indices), f_hat, decoded, images, tuple(head_logits) if settings.return_logits else None
    )


class NextScaleSampler(ClassConditionalSampler):
    """`sampler(var_params, vae_params, labels, key) -> NextScaleSample`, compiled once per batch size."""

    def __init__(self, var: NextScaleTransformer, vae: MultiScaleVQVAE, settings: NextScaleSampling | None = None):
        if tuple(var.config.patch_nums) != tuple(vae.config.patch_nums):
            raise ValueError(f"VAR patch_nums {var.config.patch_nums} != VQVAE patch_nums {vae.config.patch_nums}")
        if (var.config.vocab_size, var.config.z_channels) != (vae.config.vocab_size, vae.config.z_channels):
            raise ValueError(
                f"VAR expects a tokenizer with vocab {var.config.vocab_size} and z_channels "
                f"{var.config.z_channels}; the VQVAE has {vae.config.vocab_size}, {vae.config.z_channels}"
            )
        super().__init__(sample_next_scale, var, vae, settings or NextScaleSampling(), var.config.num_classes)
