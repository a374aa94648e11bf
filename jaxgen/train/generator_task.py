"""The generator objective: cross-entropy of the next scale (VAR) or the next token (LlamaGen, and any 1D
tokenizer's `[B, K]` ids) on token ids written once by the tokenizer (`encode_fn`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.generators.next_scale import next_scale_loss
from jaxgen.models.generators.next_token import next_token_loss
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.train.step import LossContext
from jaxgen.train.task import Task


def _split_scales(tokens_bl: jax.Array, patch_nums) -> list[jax.Array]:
    ends = np.cumsum([p * p for p in patch_nums])
    return [tokens_bl[:, e - p * p : e] for p, e in zip(patch_nums, ends, strict=True)]


def generator_task(objective: str, tokenizer, generator, tokenizer_params: Any = None) -> Task:
    """Cross-entropy of `generator` on tokenizer ids `[B, L]`. `objective`: "next_scale" (VAR: the teacher-forcing
    input is built from the frozen `tokenizer_params`) or "next_token". Label dropout for classifier-free guidance
    happens inside the models when `train=True` (rng 'dropout')."""
    c = generator.config
    if objective == "next_scale":
        init_args = (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - c.first_l, c.z_channels)))

        def loss_fn(params, batch, ctx: LossContext):
            tokens, labels = batch["tokens"], batch["label"]
            x = tokenizer.apply(
                {"params": ctx.frozen},
                _split_scales(tokens, c.patch_nums),
                method=MultiScaleVQVAE.teacher_forcing_input,
            )
            logits = generator.apply({"params": params}, labels, x, train=True, rngs={"dropout": ctx.rng})
            metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}
            return next_scale_loss(logits, tokens), (metrics, ctx.model_state)

    elif objective == "next_token":
        init_args = (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.block_size - 1), jnp.int32))

        def loss_fn(params, batch, ctx: LossContext):
            tokens, labels = batch["tokens"], batch["label"]
            logits = generator.apply({"params": params}, labels, tokens[:, :-1], train=True, rngs={"dropout": ctx.rng})
            metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}
            return next_token_loss(logits, tokens), (metrics, ctx.model_state)

    else:
        raise ValueError(f"generator objective {objective!r}: use 'next_scale' or 'next_token'")

    def init(key):
        return generator.init(key, *init_args)["params"], {}

    return Task("generator", init, loss_fn, "tokens", frozen=tokenizer_params)


def encode_fn(tokenizer, params) -> Callable[[np.ndarray], np.ndarray]:
    """Images `[B, H, W, 3]` in [-1, 1] -> token ids `[B, L]` int32 (VAR: the scales concatenated, coarse first)."""
    if isinstance(tokenizer, MultiScaleVQVAE):
        f = jax.jit(lambda p, x: jnp.concatenate(tokenizer.apply({"params": p}, x, method="img_to_indices"), axis=1))
    else:
        f = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="encode")[1])
    return lambda images: np.asarray(f(params, images), np.int32)
