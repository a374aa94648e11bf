"""The tokenizer objective: reconstruction + perceptual + codebook/commitment + entropy + adversarial losses.

    loss = rec_weight * |x - x_rec|_{1|2} + perceptual_weight * LPIPS(x, x_rec)          (the "nll")
         + codebook_weight * (codebook + commitment)                                      (straight-through)
         + entropy_weight * (per-sample entropy - batch entropy of the code assignments)
         + [step >= disc_start] * (lambda * G(D(x_rec)) + D_loss(D(x), D(x_rec)))

lambda = disc_weight * |grad_W nll| / (|grad_W G| + 1e-4) (VQGAN's adaptive weight, W = the decoder's last layer)
or disc_weight alone. The tokenizer and the discriminator are one param tree {"tokenizer", "discriminator"} trained
in one step: the generator terms see the discriminator through stop_gradient and the discriminator loss sees the
reconstruction through stop_gradient, so one gradient carries both updates (each group has its own optimizer).

Codebook health is tracked in the train state's `model_state` (no gradients): the step at which each code was last
used, giving `codebook_usage` (fraction of the codes used in the last `usage_window` steps) and, for multi-scale
quantizers, `codebook_usage/scale_P` for the P x P scale.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxgen.eval.image_metrics import psnr, ssim
from jaxgen.models.discriminators import PatchDiscriminator
from jaxgen.models.lpips import (
    LPIPSWeightsMissing,
    default_lpips_path,
    load_lpips_params,
    lpips_distance,
    missing_weights_message,
)
from jaxgen.train import codebook_metrics as cbm
from jaxgen.train.losses.adversarial import D_LOSSES, G_LOSSES, adaptive_weight, disc_factor
from jaxgen.train.losses.config import REC_LOSSES, TokenizerLossConfig  # re-exported: the config section
from jaxgen.train.losses.entropy import entropy_loss
from jaxgen.train.optim import make_optimizer
from jaxgen.train.step import LossContext
from jaxgen.train.task import Task

# ---- what the objective reads of the tokenizer (`jaxgen.models.tokenizers.protocol.Tokenizer`) -------------------


def example_image(tokenizer, image_size: int | None = None) -> jax.Array:
    """A `[1, S, S, 3]` zero image: S = `image_size`, else a size the tokenizer takes."""
    c = tokenizer.config
    size = image_size or getattr(c, "image_size", None) or 2 * c.downsample
    return jnp.zeros((1, size, size, 3))


def scale_sides(tokenizer, image_size: int) -> tuple[int, ...] | None:
    """Side of each scale's token map for multi-scale tokenizers, else None."""
    return tokenizer.token_layout(image_size).scale_sides


# ---- params in and out ------------------------------------------------------------------------------------------


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _with_leaf(tree, path, value):
    """A copy of the nested dict `tree` with the leaf at `path` replaced."""
    if not path:
        return value
    return {**tree, path[0]: _with_leaf(tree[path[0]], path[1:], value)}


def inference_params(tok_params: Any, variables: Mapping) -> Any:
    """Tokenizer params for encoding/decoding/sampling: with an EMA codebook (the "codebook" collection, see
    `jaxgen.models.tokenizers.quantizers`), its `embedding` goes where a gradient-trained codebook lives
    (`.../embedding/embedding`), so the inference model (EMA off) reads the same codes."""
    book = variables.get("codebook")
    if not book:
        return tok_params
    flat = traverse_util.flatten_dict(nn.unbox(tok_params))
    for path, value in traverse_util.flatten_dict(nn.unbox(book)).items():
        if path[-1] == "embedding":
            flat[(*path[:-1], "embedding", "embedding")] = value
    return traverse_util.unflatten_dict(flat)


def _sown(tree: Any, name: str) -> list[jax.Array]:
    """Every value sown under `name` (flax `sow` keeps tuples) anywhere in an "intermediates" tree."""
    flat = traverse_util.flatten_dict(tree) if tree else {}
    return [v for path, vals in flat.items() if path[-1] == name for v in vals]


# ---- the task -----------------------------------------------------------------------------------------------------


def tokenizer_task(
    tokenizer, loss_cfg: TokenizerLossConfig | None = None, *, image_size: int | None = None, frozen: Any = None
) -> Task:
    """The tokenizer stage's `Task` for `image_size` px training images. `frozen` = {"lpips": params} when
    `perceptual_weight > 0` (see `load_lpips_frozen`)."""
    cfg = loss_cfg or TokenizerLossConfig()
    if cfg.perceptual_weight > 0 and not (frozen and "lpips" in frozen):
        raise ValueError("tokenizer_loss.perceptual_weight > 0 needs the LPIPS params: pass frozen=load_lpips_frozen()")
    vocab = tokenizer.vocab_size
    image = example_image(tokenizer, image_size)
    sides = scale_sides(tokenizer, image.shape[1])
    disc = PatchDiscriminator(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers, norm=cfg.disc_norm) if cfg.use_gan else None
    rec_term = REC_LOSSES[cfg.rec_loss]

    def init(key):
        k_tok, k_book, k_disc = jax.random.split(key, 3)
        variables = tokenizer.init({"params": k_tok, "codebook": k_book}, image)
        params = {"tokenizer": variables["params"]}
        if disc is not None:
            params["discriminator"] = disc.init(k_disc, image)["params"]
        model_state = {
            "variables": {k: v for k, v in variables.items() if k not in ("params", "intermediates")},
            "last_hit": jnp.full((vocab,), -1, jnp.int32),
        }
        if sides:
            model_state["last_hit_scale"] = jnp.full((len(sides), vocab), -1, jnp.int32)
        return params, model_state

    def nll_fn(rec, img, frozen):
        """Reconstruction + perceptual loss of `rec` against `img` (both `[B, H, W, 3]`), a scalar."""
        nll = cfg.rec_weight * rec_term(rec, img)
        if cfg.perceptual_weight > 0:
            nll = nll + cfg.perceptual_weight * jnp.mean(lpips_distance(frozen["lpips"], rec, img))
        return nll

    def loss_fn(params, batch, ctx: LossContext):
        img = batch["image"]
        variables = ctx.model_state["variables"]
        last = tuple(tokenizer.last_layer)

        def forward(w):
            p = _with_leaf(params["tokenizer"], last, w)
            (rec, vq_loss, ids), updated = tokenizer.apply(
                {"params": p, **variables},
                img,
                mutable=["intermediates", *variables],
                rngs={"codebook": ctx.rng},
            )
            return rec, (vq_loss, ids, updated)

        metrics: dict[str, jax.Array] = {}
        w_last = _get(params["tokenizer"], last)
        if disc is None:
            rec, (vq_loss, ids, updated) = forward(w_last)
            nll = nll_fn(rec, img, ctx.frozen)
            adversarial = 0.0
        else:
            rec, rec_vjp, (vq_loss, ids, updated) = jax.vjp(forward, w_last, has_aux=True)
            nll, nll_vjp = jax.vjp(lambda r: nll_fn(r, img, ctx.frozen), rec)
            d_params = params["discriminator"]
            g_fn = G_LOSSES[cfg.gen_loss]
            g_loss, g_vjp = jax.vjp(lambda r: g_fn(disc.apply({"params": jax.lax.stop_gradient(d_params)}, r)), rec)
            if cfg.adaptive_disc_weight:
                grad_w = lambda vjp, out: rec_vjp(vjp(jnp.ones_like(out))[0])[0]
                lam = cfg.disc_weight * adaptive_weight(grad_w(nll_vjp, nll), grad_w(g_vjp, g_loss))
            else:
                lam = jnp.asarray(cfg.disc_weight, jnp.float32)
            factor = disc_factor(ctx.step, cfg.disc_start)
            logits_real = disc.apply({"params": d_params}, jax.lax.stop_gradient(img))
            logits_fake = disc.apply({"params": d_params}, jax.lax.stop_gradient(rec))
            d_loss = D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
            adversarial = factor * (lam * g_loss + d_loss)
            metrics |= {
                "g_loss": g_loss,
                "d_loss": d_loss,
                "disc_weight": lam,
                "disc_factor": factor,
                "logits_real": jnp.mean(logits_real),
                "logits_fake": jnp.mean(logits_fake),
            }

        sown = updated.get("intermediates", {})
        entropy = 0.0
        if cfg.entropy_weight > 0:
            parts = [entropy_loss(lg, cfg.entropy_temperature) for lg in _sown(sown, "code_logits")]
            entropy = sum(p[0] for p in parts) / len(parts)
            metrics["per_sample_entropy"] = sum(p[1]["per_sample_entropy"] for p in parts) / len(parts)
            metrics["batch_entropy"] = sum(p[1]["batch_entropy"] for p in parts) / len(parts)
            metrics["entropy_loss"] = entropy
        restarted = _sown(sown, "restarted_codes")
        if restarted:
            metrics["restarted_codes"] = sum(jnp.asarray(r, jnp.float32) for r in restarted)

        loss = nll + cfg.codebook_weight * vq_loss + cfg.entropy_weight * entropy + adversarial
        model_state, usage = _track_usage(ctx.model_state, ids, ctx.step, sides, vocab, cfg.usage_window)
        model_state["variables"] = {k: updated[k] for k in variables}
        flat_ids = jnp.concatenate(ids, axis=1) if isinstance(ids, list | tuple) else ids
        metrics |= usage | {
            "rec_loss": rec_term(rec, img),
            "nll": nll,
            "vq_loss": vq_loss,
            "psnr": jnp.mean(psnr(jnp.clip(rec, -1.0, 1.0), img)),
            "perplexity": cbm.perplexity(flat_ids, vocab),
        }
        return loss, (metrics, model_state)

    def optimizer(tc) -> optax.GradientTransformation:
        if disc is None:
            return optax.multi_transform({"tokenizer": make_optimizer(tc)}, _top_level_labels)
        d = tc.to_dict() if hasattr(tc, "to_dict") else dict(tc)
        disc_tc = types.SimpleNamespace(**(d | {"lr": float(tc.lr) * cfg.disc_lr_ratio, "weight_decay": 0.0}))
        return optax.multi_transform(
            {"tokenizer": make_optimizer(tc), "discriminator": make_optimizer(disc_tc)}, _top_level_labels
        )

    def export(state) -> Any:
        return inference_params(state.ema_params["tokenizer"], state.model_state["variables"])

    return Task("tokenizer", init, loss_fn, "image", frozen=frozen, optimizer=optimizer, export=export)


def _top_level_labels(params: Mapping) -> dict:
    return {k: jax.tree.map(lambda _, name=k: name, v) for k, v in params.items()}


def _track_usage(model_state, ids, step, sides, vocab, window):
    """Update the last-hit counters with this batch's ids; returns (model_state, usage metrics)."""
    state = dict(model_state)
    if sides:
        flat = jnp.concatenate(ids, axis=1)
        state["last_hit_scale"] = jnp.stack(
            [cbm.update_last_hit(h, i, step) for h, i in zip(model_state["last_hit_scale"], ids, strict=True)]
        )
    else:
        flat = ids
    state["last_hit"] = cbm.update_last_hit(model_state["last_hit"], flat, step)
    usage = {"codebook_usage": cbm.window_usage(state["last_hit"], step, window)}
    if sides:
        for side, hits in zip(sides, state["last_hit_scale"], strict=True):
            usage[f"codebook_usage/scale_{side}"] = cbm.window_usage(hits, step, window)
    return state, usage


def lpips_path(loss_cfg: TokenizerLossConfig) -> Path:
    """The LPIPS weight file the config points at (`lpips_weights`, else the default location)."""
    return Path(loss_cfg.lpips_weights).expanduser() if loss_cfg.lpips_weights else default_lpips_path()


def check_lpips_weights(loss_cfg: TokenizerLossConfig) -> None:
    """When the config asks for the perceptual loss, its weight file must exist (else an error that says how to
    make it or switch the loss off)."""
    if loss_cfg.perceptual_weight > 0 and not lpips_path(loss_cfg).is_file():
        raise LPIPSWeightsMissing(missing_weights_message(lpips_path(loss_cfg)))


def load_lpips_frozen(loss_cfg: TokenizerLossConfig) -> dict | None:
    """{"lpips": params} when the config asks for the perceptual loss (a clear error if the file is missing)."""
    if loss_cfg.perceptual_weight <= 0:
        return None
    return {"lpips": load_lpips_params(lpips_path(loss_cfg))}


# ---- evaluation -----------------------------------------------------------------------------------------------


def evaluate_tokenizer(
    tokenizer, params: Any, images: np.ndarray, *, batch_size: int = 64, lpips_params: Any = None
) -> dict[str, float]:
    """Reconstruction quality of `tokenizer` (inference params) on `images` `[N, H, W, 3]` in [-1, 1]: mean PSNR (dB),
    SSIM, LPIPS (when `lpips_params` is given), and codebook usage (fraction of the codes used over all N images),
    perplexity, and per-scale usage for multi-scale tokenizers."""
    vocab, sides = tokenizer.vocab_size, scale_sides(tokenizer, images.shape[1])

    @jax.jit
    def run(x):
        rec, _, ids = tokenizer.apply({"params": params}, x)
        rec = jnp.clip(rec, -1.0, 1.0)
        out = {"psnr": psnr(rec, x), "ssim": ssim(rec, x)}
        if lpips_params is not None:
            out["lpips"] = lpips_distance(lpips_params, rec, x)
        return out, ids

    sums: dict[str, float] = {}
    all_ids = []
    for start in range(0, len(images), batch_size):
        out, ids = jax.device_get(run(jnp.asarray(images[start : start + batch_size])))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(v))
        all_ids.append([np.asarray(i) for i in ids] if isinstance(ids, list | tuple) else [np.asarray(ids)])
    result = {k: v / len(images) for k, v in sums.items()}
    per_scale = [np.concatenate(parts) for parts in zip(*all_ids, strict=True)]
    flat = np.concatenate(per_scale, axis=1)
    result["codebook_usage"] = float(cbm.batch_usage(jnp.asarray(flat), vocab))
    result["perplexity"] = float(cbm.perplexity(jnp.asarray(flat), vocab))
    if sides:
        for side, ids in zip(sides, per_scale, strict=True):
            result[f"codebook_usage/scale_{side}"] = float(cbm.batch_usage(jnp.asarray(ids), vocab))
    result["eval_images"] = len(images)
    return result


def reconstruct_fn(tokenizer) -> Callable[[Any, jax.Array], jax.Array]:
    """(inference params, images `[B, H, W, 3]`) -> reconstructions clipped to [-1, 1], jitted."""
    return jax.jit(lambda p, x: jnp.clip(tokenizer.apply({"params": p}, x)[0], -1.0, 1.0))
