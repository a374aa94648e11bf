"""The train state: everything a step reads and writes, as one pytree that Orbax saves whole."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # the trained model's params (float32)
    opt_state: optax.OptState
    ema_params: Any  # exponential moving average of params (float32); samples and evals use these
    rng: jax.Array  # uint32 [2]: raw key data, so the checkpoint holds plain arrays
    # Variables the loss updates without gradients (e.g. an EMA codebook and its statistics, codebook-usage
    # counters); {} when the task has none.
    model_state: Any = struct.field(default_factory=dict)


def create_state(
    params: Any, tx: optax.GradientTransformation, seed_key: jax.Array, model_state: Any | None = None
) -> TrainState:
    """Step 0 state around freshly initialised `params`; `seed_key` is a raw uint32 [2] key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=seed_key,
        model_state={} if model_state is None else model_state,
    )
