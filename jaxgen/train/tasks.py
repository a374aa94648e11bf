"""What a train stage optimises: the model, its init inputs, its loss, and how its batches look.

A run trains a family's tokenizer (stage "tokenizer": reconstruction + codebook + commitment losses) and then its
generator on the tokenizer's ids (stage "generator": cross-entropy of the next token / next scale). Each stage is one
`Task`; the loop in `jaxgen.train.loop` runs any task the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.generators.next_scale import next_scale_loss
from jaxgen.models.generators.next_token import next_token_loss
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.models.tokenizers.vqgan import VQGAN


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # "tokenizer" | "generator"
    module: Any  # the flax module being trained
    init_args: tuple  # example inputs for module.init
    loss_fn: Callable  # (params, batch, rng, frozen) -> (loss, metrics)
    batch_key: str  # "image" (tokenizer) or "tokens" (generator): the batch field the stage reads


def _codebook_usage(ids: jax.Array, vocab: int) -> jax.Array:
    """Fraction of the `vocab` codes that occur in `ids` (any shape)."""
    hits = jnp.zeros((vocab,), jnp.float32).at[ids.reshape(-1)].max(1.0)
    return hits.mean()


def _psnr(rec: jax.Array, img: jax.Array) -> jax.Array:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), the reconstruction clipped to that range."""
    mse = jnp.mean((jnp.clip(rec, -1.0, 1.0) - img) ** 2)
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def tokenizer_task(tokenizer, *, rec_loss: str = "l1") -> Task:
    """Reconstruction (l1 or l2) + the quantizer's codebook and commitment losses, straight-through gradients."""
    if rec_loss not in ("l1", "l2"):
        raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
    c = tokenizer.config
    vocab = c.vocab_size if isinstance(tokenizer, MultiScaleVQVAE) else c.codebook_size
    size = c.image_size if isinstance(tokenizer, MultiScaleVQVAE) else 2 * c.downsample

    def loss_fn(params, batch, rng, frozen):
        del rng, frozen
        img = batch["image"]
        rec, vq_loss, ids = tokenizer.apply({"params": params}, img)
        ids = jnp.concatenate(ids, axis=1) if isinstance(ids, list | tuple) else ids
        err = rec - img
        rec_term = jnp.mean(jnp.abs(err)) if rec_loss == "l1" else jnp.mean(err**2)
        metrics = {
            "rec_loss": rec_term,
            "vq_loss": vq_loss,
            "psnr": _psnr(rec, img),
            "codebook_usage": _codebook_usage(ids, vocab),
        }
        return rec_term + vq_loss, metrics

    return Task("tokenizer", tokenizer, (jnp.zeros((1, size, size, 3)),), loss_fn, "image")


def _split_scales(tokens_bl: jax.Array, patch_nums) -> list[jax.Array]:
    ends = np.cumsum([p * p for p in patch_nums])
    return [tokens_bl[:, e - p * p : e] for p, e in zip(patch_nums, ends, strict=True)]


def generator_task(family: str, tokenizer, generator) -> Task:
    """Cross-entropy of the generator on tokenizer ids `[B, L]`; `frozen` = the tokenizer's params (VAR builds its
    teacher-forcing input from them). Label dropout for classifier-free guidance happens inside the models when
    `train=True` (rng 'dropout')."""
    if family == "var":
        c = generator.config
        init_args = (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - c.first_l, c.z_channels)))

        def loss_fn(params, batch, rng, frozen):
            tokens, labels = batch["tokens"], batch["label"]
            x = tokenizer.apply(
                {"params": frozen}, _split_scales(tokens, c.patch_nums), method=MultiScaleVQVAE.teacher_forcing_input
            )
            logits = generator.apply({"params": params}, labels, x, train=True, rngs={"dropout": rng})
            return next_scale_loss(logits, tokens), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}

    elif family == "llamagen":
        c = generator.config
        init_args = (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.block_size - 1), jnp.int32))

        def loss_fn(params, batch, rng, frozen):
            del frozen
            tokens, labels = batch["tokens"], batch["label"]
            logits = generator.apply({"params": params}, labels, tokens[:, :-1], train=True, rngs={"dropout": rng})
            return next_token_loss(logits, tokens), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}

    else:
        raise ValueError(f"no generator task for family {family!r}")
    return Task("generator", generator, init_args, loss_fn, "tokens")


def encode_fn(tokenizer, params) -> Callable[[np.ndarray], np.ndarray]:
    """Images `[B, H, W, 3]` in [-1, 1] -> token ids `[B, L]` int32 (VAR: the scales concatenated, coarse first)."""
    if isinstance(tokenizer, MultiScaleVQVAE):
        f = jax.jit(lambda p, x: jnp.concatenate(tokenizer.apply({"params": p}, x, method="img_to_indices"), axis=1))
    elif isinstance(tokenizer, VQGAN):
        f = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="encode")[1])
    else:
        raise TypeError(f"no encoder for {type(tokenizer).__name__}")
    return lambda images: np.asarray(f(params, images), np.int32)


def reconstruct_fn(tokenizer) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, images `[B, H, W, 3]`) -> reconstructions clipped to [-1, 1], jitted."""
    return jax.jit(lambda p, x: jnp.clip(tokenizer.apply({"params": p}, x)[0], -1.0, 1.0))
