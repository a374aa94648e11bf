"""HMAR sampling: per scale one Markovian next-scale step, then the schedule's masked refinement steps; one jit.

Per scale s with side p and schedule entry `mask_schedule[s] = (n_0, n_1, ..., n_{K-1})` (the entries sum to p^2):

    next-scale step   `next_scale.next_scale_step` with the next-scale branch on this scale's p^2 tokens alone
                      (batch [cond; null], no KV cache, VAR's guidance ramp cfg * s / (S - 1)), top-k / top-p, draw
    re-mask           the M = n_1 + ... + n_{K-1} tokens with the lowest confidence, the probability of the drawn
                      token after filtering (`remask.mask_lowest`: stable, so ties mask the lowest raster index first)
    mask step j       the mask branch on [coarser context + own tokens, mask_embed where masked]; guidance strength
                      cfg * 1e-6 as upstream (in effect the conditional logits); draw; only masked tokens change;
                      then the n_{j+1} + ... + n_{K-1} least confident of them stay masked
    update            f_hat += Phi(bicubic(codes)); the next scale's input is area(f_hat)

n_0 is not read (the next-scale step keeps p^2 - M tokens); scales with p = 1 and one-entry rows are not refined.
The schedule is a sampling setting: any schedule runs on the same trained model (a new one compiles anew).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from jaxgen.models.generators.hmar import HMARTransformer
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.common import ClassConditionalSampler
from jaxgen.sampling.filters import filter_logits, sample_categorical
from jaxgen.sampling.guidance import guide, split_guided, with_null_class
from jaxgen.sampling.next_scale import NextScaleState, next_scale_step
from jaxgen.sampling.remask import mask_lowest

# upstream's released schedule for the 256 px scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): the 2x2 scale re-predicts 3
# tokens in one step, the 3x3 scale 8, then 7, then 5 over three steps
RELEASED_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
RELEASED_SCHEDULE = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))
MASK_STEP_GUIDANCE = 1e-6  # upstream's hard-coded ratio of the mask steps: strength cfg * 1e-6


@dataclasses.dataclass(frozen=True)
class HMARSampling:
    """Sampling settings (defaults: the released d16 sampling config)."""

    cfg: float = 1.7
    top_k: int = 1000
    top_p: float = 0.99
    temperature: float = 1.0
    greedy: bool = False  # arg-max instead of the draw (deterministic; what the golden fixture's main run does)
    refine: bool = True  # False: pure Markovian next-scale sampling (upstream's mask=False)
    # per scale (n_0, n_1, ...), each row summing to p^2; None: the released schedule (released patch_nums only)
    mask_schedule: tuple[tuple[int, ...], ...] | None = None
    return_trace: bool = False  # also every step's inputs, raw logits, masks and ids (`HMARSample.trace`)

    def __post_init__(self):
        if self.mask_schedule is not None:
            object.__setattr__(self, "mask_schedule", tuple(tuple(int(n) for n in row) for row in self.mask_schedule))

    def schedule_for(self, patch_nums: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """The mask schedule for `patch_nums`, checked: one row per scale, positive entries summing to p^2."""
        patch_nums = tuple(patch_nums)
        schedule = self.mask_schedule
        if schedule is None:
            if patch_nums != RELEASED_PATCH_NUMS:
                raise ValueError(
                    f"sampling.mask_schedule is not set and patch_nums {patch_nums} are not the released "
                    f"{RELEASED_PATCH_NUMS}: give one row per scale, e.g. "
                    f"{tuple((p * p,) for p in patch_nums)} (no refinement)"
                )
            return RELEASED_SCHEDULE
        check_mask_schedule(schedule, patch_nums)
        return schedule


def check_mask_schedule(schedule: Sequence[Sequence[int]], patch_nums: Sequence[int]) -> None:
    """One row per scale; each row's entries positive and summing to that scale's token count p^2."""
    if len(schedule) != len(patch_nums):
        raise ValueError(
            f"sampling.mask_schedule has {len(schedule)} rows but the model has {len(patch_nums)} scales "
            f"{tuple(patch_nums)}: give one row per scale"
        )
    for s, (row, p) in enumerate(zip(schedule, patch_nums, strict=True)):
        if not row or any(n < 1 for n in row) or sum(row) != p * p:
            raise ValueError(
                f"sampling.mask_schedule[{s}]={tuple(row)} does not fit scale {s} ({p}x{p} = {p * p} tokens): its "
                f"entries must be positive and sum to {p * p}, e.g. ({p * p},) for no refinement"
            )


@flax.struct.dataclass
class HMARSample:
    indices: tuple[jax.Array, ...]  # per scale: int32 [B, p_k^2], after refinement
    f_hat: jax.Array  # float32 [B, P, P, Cvae]
    decoded: jax.Array  # float32 [B, H, W, 3], raw decoder output (not clamped)
    images: jax.Array  # float32 [B, H, W, 3] in [0, 1]
    # with return_trace, by the golden fixture's names: x_s{k} / ns_logits_s{k} ([2B, p^2, C | V]; rows B.. null
    # class), ns_idx_s{k} (before refinement), s{k}_m{j}_{mask,x,logits,idx} for mask step j, fhat_after_s{k}
    trace: dict[str, jax.Array] | None = None

    def token_arrays(self) -> dict[str, jax.Array]:
        return {**{f"indices_s{k}": i for k, i in enumerate(self.indices)}, "tokens": jnp.concatenate(self.indices, 1)}


def draw_tokens(key: jax.Array, guided_blv: jax.Array, settings: HMARSampling) -> tuple[jax.Array, jax.Array]:
    """Filter guided logits `[B, l, V]` and draw (or take the arg-max): (ids `[B, l]` int32, confidence `[B, l]`,
    the filtered softmax probability of each drawn id)."""
    filtered = filter_logits(guided_blv, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    idx = jnp.argmax(filtered, -1).astype(jnp.int32) if settings.greedy else sample_categorical(key, filtered)
    probs = jax.nn.softmax(filtered, axis=-1)
    return idx, jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0]


def sample_hmar(
    model: HMARTransformer,
    vae: MultiScaleVQVAE,
    settings: HMARSampling,
    model_params,
    vae_params,
    labels_b: Int[Array, " B"],
    key: jax.Array,
) -> HMARSample:
    """The whole generation for labels `[B]` (traceable; `HMARSampler` jits it)."""
    c = model.config
    num_scales = len(c.patch_nums)
    schedule = settings.schedule_for(c.patch_nums) if settings.refine else None
    b = labels_b.shape[0]
    model_apply = lambda method, *a: model.apply({"params": model_params}, *a, method=method)
    vae_apply = lambda method, *a: vae.apply({"params": vae_params}, *a, method=method)
    cond = model_apply(HMARTransformer.cond_embed, with_null_class(labels_b, c.num_classes))  # [2B, C]
    codebook = vae_apply(MultiScaleVQVAE.codebook)  # [V, Cvae]
    draw = lambda k, guided, si: draw_tokens(k, guided, settings)
    logits_fn = lambda x, cache: (model_apply(HMARTransformer.decode_scale, x, cond, None)[0], None)
    trace: dict[str, jax.Array] = {}
    big = c.patch_nums[-1]
    state = NextScaleState(
        x=model_apply(HMARTransformer.first_tokens, cond),
        f_hat=jnp.zeros((b, big, big, c.z_channels), jnp.float32),
        cache=None,
        key=key,
    )
    indices = []
    for si, pn in enumerate(c.patch_nums):
        x_ns = state.x
        state, idx, confidence, logits = next_scale_step(state, si, logits_fn, draw, settings.cfg, num_scales)
        trace.update({f"x_s{si}": x_ns, f"ns_logits_s{si}": logits, f"ns_idx_s{si}": idx})
        counts = schedule[si][1:] if schedule is not None and pn > 1 else ()
        masked = mask_lowest(confidence, sum(counts)) if counts else None
        for j in range(1, len(counts) + 1):
            own = vae_apply(MultiScaleVQVAE.own_scale_map, si, codebook[idx].reshape(b, pn, pn, c.z_channels))
            x = model_apply(HMARTransformer.with_own_tokens, x_ns[:b], own.reshape(b, pn * pn, -1), masked)
            x = jnp.concatenate([x, x], axis=0)  # [cond; null] see the same tokens
            logits = model_apply(HMARTransformer.decode_masked_scale, x, cond)
            guided = guide(*split_guided(logits), settings.cfg * MASK_STEP_GUIDANCE)
            key, step_key = jax.random.split(state.key)
            state = state.replace(key=key)
            new, confidence = draw_tokens(step_key, guided, settings)
            trace.update({f"s{si}_m{j}_mask": masked, f"s{si}_m{j}_x": x, f"s{si}_m{j}_logits": logits})
            idx = jnp.where(masked, new, idx)
            trace[f"s{si}_m{j}_idx"] = idx
            if j < len(counts):  # the least confident of the re-drawn tokens stay masked
                masked = mask_lowest(jnp.where(masked, confidence, jnp.inf), sum(counts[j:]))
        indices.append(idx)
        f_hat, next_map = vae_apply(
            MultiScaleVQVAE.next_autoregressive_input, si, state.f_hat, codebook[idx].reshape(b, pn, pn, -1)
        )
        trace[f"fhat_after_s{si}"] = f_hat
        x = state.x
        if si != num_scales - 1:
            x = model_apply(HMARTransformer.embed_scale, next_map.reshape(b, -1, c.z_channels), si + 1)
            x = jnp.concatenate([x, x], axis=0)
        state = state.replace(x=x, f_hat=f_hat)
    decoded = vae_apply(MultiScaleVQVAE.fhat_to_img, state.f_hat)
    images = (jnp.clip(decoded, -1.0, 1.0) + 1.0) / 2.0
    return HMARSample(tuple(indices), state.f_hat, decoded, images, trace if settings.return_trace else None)


class HMARSampler(ClassConditionalSampler):
    """`sampler(model_params, vae_params, labels, key) -> HMARSample`, compiled once per batch size; the settings
    (schedule included) are checked against the model before anything compiles."""

    def __init__(self, model: HMARTransformer, vae: MultiScaleVQVAE, settings: HMARSampling | None = None):
        settings = settings or HMARSampling()
        c = model.config
        if tuple(c.patch_nums) != tuple(vae.config.patch_nums):
            raise ValueError(f"HMAR patch_nums {c.patch_nums} != VQVAE patch_nums {vae.config.patch_nums}")
        if (c.vocab_size, c.z_channels) != (vae.config.vocab_size, vae.config.z_channels):
            raise ValueError(
                f"HMAR expects a tokenizer with vocab {c.vocab_size} and z_channels {c.z_channels}; the VQVAE has "
                f"{vae.config.vocab_size}, {vae.config.z_channels}"
            )
        if settings.refine:
            settings.schedule_for(c.patch_nums)
        super().__init__(sample_hmar, model, vae, settings, c.num_classes)

    def with_settings(self, **changes) -> HMARSampler:
        """The same models with other settings (e.g. another `mask_schedule`: no retraining, a new compile)."""
        return HMARSampler(self.generator, self.tokenizer, dataclasses.replace(self.settings, **changes))
