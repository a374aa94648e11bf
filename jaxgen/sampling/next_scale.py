"""Class-conditional next-scale sampling (VAR; HMAR's next-scale steps): all scales in one jitted function.

The scale loop unrolls at trace time (every scale has its own static length). Per scale k, `next_scale_step` composes
the shared pieces over a `NextScaleState`:

    logits_fn(x, cache)          the generator on this scale's tokens, doubled batch [cond; null] (KV cache with the
                                 scale-causal mask; none with HMAR's Markov mask, whose scales see only themselves)
    guide(..., linear_ramp(k))   (1 + t) cond - t null, with VAR's ramp t = cfg * k / (S - 1)
    filter_logits                temperature, top-k, top-p
    sample_categorical           the draw (or the Gumbel "more smooth" soft codes)
    tokenizer update             f_hat += Phi(bicubic(codes)); the next scale's input is area(f_hat)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxgen.models.generators.next_scale import NextScaleTransformer
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.common import ClassConditionalSampler
from jaxgen.sampling.filters import filter_logits, gumbel_softmax, sample_categorical
from jaxgen.sampling.guidance import guide, linear_ramp, split_guided, with_null_class


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
class NextScaleState:
    """What the scale loop carries from one scale to the next."""

    x: jax.Array  # float32 [2B, p_k^2, C]: scale k's input tokens (the [cond; null] halves share them)
    f_hat: jax.Array  # float32 [B, P, P, Cvae]: the upsampled codes of the scales so far, summed
    cache: Any  # per block (k, v), each [2B, H, L_so_far, head_dim]; None before scale 0 and without a KV cache
    key: jax.Array  # PRNG key, split once per scale


@flax.struct.dataclass
class NextScaleSample:
    indices: tuple[jax.Array, ...]  # per scale: int32 [B, p_k^2]
    f_hat: jax.Array  # float32 [B, P, P, Cvae], the decoder's input (before post_quant_conv)
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output (not clamped)
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    head_logits: tuple[jax.Array, ...] | None = None  # per scale: float32 [2B, p_k^2, V] (rows B.. are null class)

    def token_arrays(self) -> dict[str, jax.Array]:
        """The tokens by name, for saving: indices_s0, indices_s1, ... and `tokens` (all scales, [B, L])."""
        return {**{f"indices_s{k}": i for k, i in enumerate(self.indices)}, "tokens": jnp.concatenate(self.indices, 1)}


# (x [2B, l, C], cache) -> (logits [2B, l, V] float32, cache including these tokens)
ScaleLogitsFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def choose_codes(
    key: jax.Array, guided_blv: jax.Array, codebook_vc: jax.Array, settings: NextScaleSampling, si: int, num_scales: int
) -> tuple[jax.Array, jax.Array]:
    """Filter and draw scale `si`'s ids from guided logits `[B, l, V]`: (ids `[B, l]` int32, codes `[B, l, Cvae]`).
    With `more_smooth` the codes are VAR's Gumbel-softmax mix (sharper at the finer scales) instead of the rows."""
    filtered = filter_logits(guided_blv, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    draw_key, gumbel_key = jax.random.split(key)
    idx = sample_categorical(draw_key, filtered)
    if not settings.more_smooth:
        return idx, codebook_vc[idx]
    ratio = si / max(num_scales - 1, 1)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    return idx, gumbel_softmax(gumbel_key, filtered * (1 + ratio), tau) @ codebook_vc


def next_scale_step(
    state: NextScaleState,
    si: int,
    logits_fn: ScaleLogitsFn,
    choose: Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]],
    cfg: float,
    num_scales: int,
) -> tuple[NextScaleState, jax.Array, jax.Array, jax.Array]:
    """Scale `si`: the generator's logits, guidance with the linear ramp, `choose(key, guided, si) -> (ids, codes)`.
    Returns (the state with the new cache and key, ids `[B, l]`, codes `[B, l, Cvae]`, raw logits `[2B, l, V]`);
    the caller adds the codes to f_hat and builds the next input (the tokenizer's update)."""
    logits, cache = logits_fn(state.x, state.cache)
    guided = guide(*split_guided(logits), linear_ramp(cfg, si, num_scales))
    key, step_key = jax.random.split(state.key)
    idx, codes = choose(step_key, guided, si)
    return state.replace(cache=cache, key=key), idx, codes, logits


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
    var_apply = lambda method, *a: var.apply({"params": var_params}, *a, method=method)
    vae_apply = lambda method, *a: vae.apply({"params": vae_params}, *a, method=method)
    cond = var_apply(NextScaleTransformer.cond_embed, with_null_class(labels_b, c.num_classes))  # [2B, C]
    codebook = vae_apply(MultiScaleVQVAE.codebook)  # [V, Cvae]

    def logits_fn(x, cache):
        logits, new_cache = var_apply(NextScaleTransformer.decode_scale, x, cond, cache)
        return logits, (new_cache if c.kv_cached else None)

    choose = lambda k, guided, si: choose_codes(k, guided, codebook, settings, si, num_scales)
    big = c.patch_nums[-1]
    state = NextScaleState(
        x=var_apply(NextScaleTransformer.first_tokens, cond),
        f_hat=jnp.zeros((b, big, big, c.z_channels), jnp.float32),
        cache=None,
        key=key,
    )
    indices, head_logits = [], []
    for si, pn in enumerate(c.patch_nums):
        state, idx, codes, logits = next_scale_step(state, si, logits_fn, choose, settings.cfg, num_scales)
        indices.append(idx)
        head_logits.append(logits)
        f_hat, next_map = vae_apply(
            MultiScaleVQVAE.next_autoregressive_input, si, state.f_hat, codes.reshape(b, pn, pn, c.z_channels)
        )
        x = state.x
        if si != num_scales - 1:
            x = var_apply(NextScaleTransformer.embed_scale, next_map.reshape(b, -1, c.z_channels), si + 1)
            x = jnp.concatenate([x, x], axis=0)  # [cond; null] share the next-scale input
        state = state.replace(x=x, f_hat=f_hat)
    decoded = vae_apply(MultiScaleVQVAE.fhat_to_img, state.f_hat)
    images = (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0
    return NextScaleSample(
        tuple(indices), state.f_hat, decoded, images, tuple(head_logits) if settings.return_logits else None
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
