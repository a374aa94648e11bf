"""MaskGIT (masked generative image transformer): the bidirectional transformer predicts masked tokens of MaskGIT's
VQGAN grid; sampling is the parallel decode (`jaxgen.sampling.masked`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxgen.convert.maskgit import add_convert_arguments, convert_checkpoints
from jaxgen.convert.maskgit_fixture import run_maskgit_fixture
from jaxgen.families.base import ConvertHook, Family, config_from_dict, derive, plain_section, token_count_check
from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from jaxgen.sampling.mask_schedule import masked_count
from jaxgen.sampling.masked import MaskedSampler, MaskedSampling


def build(vq_section, maskgit_section):
    """MaskGIT's tokenizer and transformer; the transformer's `codebook_size` is the tokenizer's unless given (and
    must equal it)."""
    vq = MaskGITVQ(config_from_dict(MaskGITVQConfig, plain_section(vq_section), "vq"))
    if not maskgit_section:
        return vq, None
    kw = derive(plain_section(maskgit_section), "maskgit", codebook_size=vq.vocab_size)
    return vq, MaskedTransformer(config_from_dict(MaskedConfig, kw, "maskgit"))


def mask_tokens(key: jax.Array, tokens_bn: jax.Array, schedule: str) -> jax.Array:
    """Which image tokens to mask `[B, N]` bool: per sample r ~ U[0, 1), the ceil(gamma(r) * N) positions with the
    smallest uniform scores (a uniformly random subset of that size)."""
    b, n = tokens_bn.shape
    k_ratio, k_order = jax.random.split(key)
    count = masked_count(jax.random.uniform(k_ratio, (b,)), n, schedule)  # [B] int32 in [1, N]
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (b, n)), axis=-1), axis=-1)
    return rank < count[:, None]


def masked_token_loss(
    logits_bnk: jax.Array, tokens_bn: jax.Array, masked_bn: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy with label smoothing over the K code columns, averaged over the masked positions; also the
    accuracy there."""
    k = logits_bnk.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(tokens_bn, k), label_smoothing)
    ce = optax.softmax_cross_entropy(logits_bnk.astype(jnp.float32), targets)
    weight = masked_bn.astype(jnp.float32)
    denom = jnp.maximum(weight.sum(), 1.0)
    accuracy = jnp.sum(weight * (jnp.argmax(logits_bnk, -1) == tokens_bn)) / denom
    return jnp.sum(weight * ce) / denom, accuracy


def objective(tokenizer, model: MaskedTransformer):
    """MaskGIT's masked-token objective on token ids `[B, N]`: mask a `config.mask_schedule`-drawn share of each
    sequence, predict the masked tokens from [class token, masked ids] with `config.label_smoothing` (label dropout
    to the null class when the model has one)."""
    del tokenizer  # the transformer reads the ids directly
    c = model.config

    def loss_fn(params, batch, ctx):
        tokens, labels = batch["tokens"], batch["label"]
        k_mask, k_label, k_drop = jax.random.split(ctx.rng, 3)
        masked = mask_tokens(k_mask, tokens, c.mask_schedule)
        if c.has_null_class:
            drop = jax.random.bernoulli(k_label, c.class_dropout_prob, labels.shape)
            labels = jnp.where(drop, c.null_class, labels)
        ids = jnp.concatenate([c.class_token(labels)[:, None], jnp.where(masked, c.mask_id, tokens)], axis=1)
        logits = model.apply({"params": params}, ids, train=True, rngs={"dropout": k_drop})
        loss, accuracy = masked_token_loss(logits[:, 1:, : c.codebook_size], tokens, masked, c.label_smoothing)
        metrics = {"accuracy": accuracy, "masked_fraction": jnp.mean(masked.astype(jnp.float32))}
        return loss, (metrics, ctx.model_state)

    return loss_fn


FAMILY = Family(
    name="maskgit",
    tokenizer_key="vq",
    generator_key="maskgit",
    build=build,
    generator_inputs=lambda model: (model.example_ids(),),
    objective=objective,
    sampler=lambda model, vq, s: MaskedSampler(model, vq, MaskedSampling(**s)),
    image_size=lambda vq, model: math.isqrt(model.config.num_tokens) * vq.config.downsample,
    check=token_count_check("maskgit.num_tokens"),
    convert=ConvertHook(
        "google-research/maskgit: the released VQGAN tokenizer + class-conditional transformer (Flax checkpoints)",
        add_convert_arguments,
        convert_checkpoints,
    ),
    golden=run_maskgit_fixture,
)
