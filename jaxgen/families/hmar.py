"""HMAR (Markovian next-scale prediction + masked refinement) on VAR's multi-scale VQVAE, trained in two stages:

"generator"  stage 1: the next-scale branch (shared base blocks + ns blocks + embeddings), block-diagonal mask,
             per-token loss weights `hmar.loss_weighting` ("lognorm" in every released recipe)
"mask"       stage 2: starts from stage 1 with the mask branch copied from the next-scale one; trains only the
             mask blocks, the mask head (with its AdaLN) and `mask_embed`, the rest frozen through the optimizer:
             r ~ U[0, 1), ceil(r p^2) positions masked at every scale after the first (the same for the whole
             batch), cross-entropy on the masked positions
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.convert.hmar import add_convert_arguments, convert_checkpoints
from jaxgen.convert.hmar_fixture import run_hmar_fixture
from jaxgen.families import var
from jaxgen.families.base import ConvertHook, Family, GeneratorStage
from jaxgen.models.generators.hmar import HMARConfig, HMARTransformer, in_mask_branch
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.hmar import HMARSampler, HMARSampling


def build(vae_section, hmar_section):
    """The VQVAE and the HMAR transformer; vocab / z_channels / patch_nums come from the VQVAE section unless given."""
    return var.build_on_vqvae(vae_section, hmar_section, "hmar", HMARConfig, HMARTransformer)


# ---- stage 1 ------------------------------------------------------------------------------------------------------
def scale_loss_weights(patch_nums, weighting: str) -> np.ndarray:
    """Each scale's total loss weight `[S]`. "lognorm": with r_k = p_k / p_last standardised (ddof 1) to z_k, scale
    i gets pdf(z_{S-1-i}) / sum_k pdf(z_k) (upstream's reversed index); "equal": 1 each; "mean": p_i^2 / L."""
    p = np.asarray(patch_nums, np.float64)
    if weighting == "lognorm":
        r = p / p[-1]
        z = (r - r.mean()) / r.std(ddof=1)
        pdf = np.exp(-0.5 * z**2)  # the standard normal density, up to its constant factor
        return pdf[::-1] / pdf.sum()
    if weighting == "equal":
        return np.ones_like(p)
    return p**2 / np.sum(p**2)


def token_loss_weights(patch_nums, weighting: str) -> np.ndarray:
    """Per-token weights `[L]` float32: each scale's total (`scale_loss_weights`) split equally over its p^2 tokens."""
    totals = scale_loss_weights(patch_nums, weighting)
    return np.concatenate([np.full(p * p, t / (p * p)) for p, t in zip(patch_nums, totals, strict=True)]).astype(
        np.float32
    )


def next_scale_objective(vae, model: HMARTransformer):
    """Stage 1: VAR's teacher-forced cross-entropy through the next-scale branch, weighted per token."""
    c = model.config
    return var.objective(vae, model, token_loss_weights(c.patch_nums, c.loss_weighting))


# ---- stage 2 ------------------------------------------------------------------------------------------------------
def mask_positions(key: jax.Array, patch_nums) -> jax.Array:
    """Stage 2's masked positions `[1, L - p_0^2]` bool, shared by the batch: r ~ U[0, 1); at every scale after the
    first, a uniformly random max(1, ceil(r p^2)) of its p^2 positions."""
    k_ratio, *k_scales = jax.random.split(key, len(patch_nums))
    ratio = jax.random.uniform(k_ratio)
    masks = []
    for k, p in zip(k_scales, patch_nums[1:], strict=True):
        count = jnp.maximum(jnp.ceil(ratio * p * p), 1)
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(k, (p * p,))))
        masks.append(rank < count)
    return jnp.concatenate(masks)[None]


def masked_cross_entropy(logits_blv, tokens_bl, masked_bl) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the masked positions (`masked_bl` broadcasts over the batch), and the accuracy there."""
    weight = jnp.broadcast_to(masked_bl, tokens_bl.shape).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_blv.astype(jnp.float32), tokens_bl)
    denom = jnp.maximum(weight.sum(), 1.0)
    return jnp.sum(weight * ce) / denom, jnp.sum(weight * (jnp.argmax(logits_blv, -1) == tokens_bl)) / denom


def mask_objective(vae, model: HMARTransformer):
    """Stage 2: the mask branch predicts each scale's masked tokens from the coarser context and the scale's
    unmasked tokens (teacher forcing, block-diagonal mask)."""
    c = model.config
    layout = vae.token_layout(vae.config.image_size)

    def loss_fn(params, batch, ctx):
        tokens, labels = batch["tokens"], batch["label"]
        k_mask, k_drop = jax.random.split(ctx.rng)
        scales = layout.split_scales(tokens)
        vae_apply = lambda method: vae.apply({"params": ctx.frozen}, scales, method=method)
        x, own = vae_apply(MultiScaleVQVAE.teacher_forcing_input), vae_apply(MultiScaleVQVAE.own_scale_input)
        masked = mask_positions(k_mask, c.patch_nums)
        logits = model.apply({"params": params}, labels, x, own, masked, train=True, rngs={"dropout": k_drop},
                             method=HMARTransformer.masked_forward)  # fmt: skip
        loss, accuracy = masked_cross_entropy(logits[:, c.first_l :], tokens[:, c.first_l :], masked)
        metrics = {"accuracy": accuracy, "masked_fraction": jnp.mean(masked.astype(jnp.float32))}
        return loss, (metrics, ctx.model_state)

    return loss_fn


def _mask_source(name: str) -> str:
    """The stage-1 param a mask-branch param starts from (upstream fine-tunes the last blocks and the head)."""
    if name.startswith("mask_blocks"):  # mask_blocks_j (unrolled) or mask_blocks (scanned, stacked)
        return "ns_blocks" + name[len("mask_blocks") :]
    return {"mask_head": "ns_head", "mask_head_nm": "ns_head_nm"}.get(name, name)


def start_mask_stage(fresh, stage1):
    """Stage 2's starting params: stage 1's, with the mask blocks and head copied from the ns blocks and head and a
    fresh `mask_embed`; `fresh` may carry logical-axis boxes (kept)."""
    is_box = lambda x: isinstance(x, nn.Partitioned | nn.LogicallyPartitioned)

    def fill(box, value):
        value = jnp.asarray(value, jnp.float32)
        return box.replace_boxed(value) if is_box(box) else value

    out = {}
    for name, sub in fresh.items():
        if name == "mask_embed":
            out[name] = sub
        else:
            out[name] = jax.tree.map(fill, sub, stage1[_mask_source(name)], is_leaf=is_box)
    return out


def check(vae, model, image_size: int) -> None:
    vae.token_layout(image_size)  # the size must be patch_nums[-1] x the downsampling


def _sampler(model, vae, settings: dict):
    return HMARSampler(model, vae, HMARSampling(**settings))


STAGES = (
    GeneratorStage(
        "generator",
        next_scale_objective,
        trainable=lambda name: not in_mask_branch(name),
        sampling=lambda s: dict(s, refine=False),  # the mask branch is not trained yet
    ),
    GeneratorStage("mask", mask_objective, trainable=in_mask_branch, start=start_mask_stage),
)

FAMILY = Family(
    name="hmar",
    tokenizer_key="vae",
    generator_key="hmar",
    build=build,
    generator_inputs=var.generator_inputs,
    objective=next_scale_objective,
    sampler=_sampler,
    image_size=lambda vae, model: vae.config.image_size,
    check=check,
    convert=ConvertHook(
        "NVlabs/HMAR: VAR's VQVAE + an HMAR transformer (d16-d30)", add_convert_arguments, convert_checkpoints
    ),
    golden=run_hmar_fixture,
    stages=STAGES,
)
