"""GAN losses on discriminator logits (any shape, e.g. PatchGAN maps `[B, h, w, 1]`), VQGAN's adaptive generator
weight and its discriminator warm-up switch. Every loss is a float32 scalar: the mean over all logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): a float32 scalar."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator logistic loss 0.5 * (mean(softplus(-real)) + mean(softplus(fake))) (taming's "vanilla"): the
    binary cross-entropy of sigmoid(logits) with targets real = 1, fake = 0, in nats. A float32 scalar."""
    loss_real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator loss paired with the hinge discriminator: -mean(fake). A float32 scalar."""
    return -jnp.mean(_f32(logits_fake))


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
    """Non-saturating generator loss mean(softplus(-fake)) = -mean(log sigmoid(fake)), in nats. A float32 scalar."""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def _global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves of an array or pytree taken together, in float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(leaf))) for leaf in leaves))


def adaptive_weight(nll_grad: Any, g_grad: Any, *, max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
    """VQGAN's adaptive generator-loss weight: ||nll_grad||_2 / (||g_grad||_2 + eps), clipped to [0, max_weight].

    `nll_grad` / `g_grad`: gradients of the reconstruction (+ perceptual) loss and of the generator loss w.r.t. the
    same parameters (usually the decoder's last layer), each an array or a pytree, whose norm is the global L2 norm
    over all leaves. Returns a float32 scalar with its gradient stopped (the weight is a constant for the update).
    """
    weight = _global_norm(nll_grad) / (_global_norm(g_grad) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def disc_factor(step: Any, start: Any) -> jax.Array:
    """Discriminator warm-up switch: float32 1.0 where `step >= start`, else 0.0 (shape of the broadcast inputs;
    `step` may be traced)."""
    return jnp.where(jnp.asarray(step) >= jnp.asarray(start), 1.0, 0.0).astype(jnp.float32)
