"""The pure train step: gradients (optionally accumulated over micro-batches), one optimizer update, EMA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxgen.models.tokenizers.quantizers import micro_batch
from jaxgen.train.state import TrainState


@struct.dataclass
class LossContext:
    """What a loss reads besides the params and the batch."""

    rng: jax.Array  # PRNG key of this (micro-)step
    step: jax.Array  # int32 []: updates taken before this one (0 at the first step)
    frozen: Any  # params that are read, not trained (the tokenizer under a generator, LPIPS); None when none
    model_state: Any  # variables the loss updates without gradients (EMA codebook, usage counters); {} when none


# (params, batch, ctx) -> (loss, (metrics, new model_state)). Metrics are float32 scalars, averaged like the loss.
LossFn = Callable[[Any, dict, LossContext], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


def _microbatches(batch: dict, accum_steps: int) -> dict:
    """`[B, ...]` -> `[A, B/A, ...]` with micro-batch i = rows i, i+A, i+2A... so that each micro-batch is spread
    over all the devices that hold the batch (a contiguous split would leave most of them idle)."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure `train_step(state, batch, frozen) -> (state, metrics)`; the caller jits it (with shardings
    and `donate_argnums=0`). Gradients of `accum_steps` micro-batches are averaged before the single update, so the
    result equals one step on the whole batch up to float summation order (for losses that are means over the
    batch). `model_state` is threaded through the micro-batches in order, each traced inside
    `quantizers.micro_batch(i, accum_steps)`, so that an EMA codebook makes the whole batch's one update per step
    (not one per micro-batch) and every micro-batch looks up the step's starting codebook; metrics are averaged."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, frozen: Any = None):
        key = jax.random.wrap_key_data(state.rng)
        next_key, step_key = jax.random.split(key)
        ctx = LossContext(rng=step_key, step=state.step, frozen=frozen, model_state=state.model_state)
        if accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(state.params, batch, ctx)
        else:
            micro = _microbatches(batch, accum_steps)

            def body(carry, xs):
                sums, model_state = carry
                mb, k, i = xs
                with micro_batch(i, accum_steps):
                    mb_ctx = ctx.replace(rng=k, model_state=model_state)
                    (mb_loss, (m, model_state)), g = grad_fn(state.params, mb, mb_ctx)
                return (jax.tree.map(jnp.add, sums, (mb_loss, m, g)), model_state), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), ctx)
            (loss_s, (metrics_s, _)), grads_s = shapes
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
            keys = jax.random.split(step_key, accum_steps)
            indices = jnp.arange(accum_steps, dtype=jnp.int32)
            (sums, model_state), _ = jax.lax.scan(body, (zeros, state.model_state), (micro, keys, indices))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, sums)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            rng=jax.random.key_data(next_key),
            model_state=model_state,
        )
        return new_state, metrics

    return train_step
