"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, no decay on vectors."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(tc: Any) -> optax.Schedule:
    """Linear warmup from 0 over `tc.warmup_steps`, then cosine from `tc.lr` to `tc.lr * tc.min_lr_ratio` at
    `tc.steps`."""
    warmup = min(int(tc.warmup_steps), max(int(tc.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(tc.lr),
        warmup_steps=warmup,
        decay_steps=max(int(tc.steps), warmup + 1),
        end_value=float(tc.lr) * float(tc.min_lr_ratio),
    )


def _decay_mask(params):
    """Weight decay on matrices and conv kernels only (ndim >= 2); biases, norms and scalars are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: Any) -> optax.GradientTransformation:
    """`tc`: a train section with lr, min_lr_ratio, warmup_steps, steps, b1, b2, weight_decay, grad_clip
    (0 = no clipping)."""
    chain = [optax.clip_by_global_norm(float(tc.grad_clip))] if tc.grad_clip > 0 else []
    chain.append(
        optax.adamw(
            learning_rate_schedule(tc),
            b1=float(tc.b1),
            b2=float(tc.b2),
            weight_decay=float(tc.weight_decay),
            mask=_decay_mask,
        )
    )
    return optax.chain(*chain)
