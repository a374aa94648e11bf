"""A generator stage's `Task`: the stage's objective on token ids written once by the tokenizer (`encode_fn`), with
the tokenizer's params frozen, and the params the stage does not train frozen too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jaxgen.families.base import Family, GeneratorStage, train_everything
from jaxgen.train.optim import make_optimizer
from jaxgen.train.task import Task


def param_labels(params: dict, trainable: Callable[[str], bool]) -> dict:
    """ "train" / "freeze" for every leaf, by its top-level name (the tree may carry logical-axis boxes)."""
    return {k: jax.tree.map(lambda _, k=k: "train" if trainable(k) else "freeze", v) for k, v in params.items()}


def stage_optimizer(trainable: Callable[[str], bool]) -> Callable[[Any], optax.GradientTransformation]:
    """The train section's optimizer on the params `trainable` names; no update (and no optimizer state) for the
    others."""
    if trainable is train_everything:
        return make_optimizer
    return lambda tc: optax.multi_transform(
        {"train": make_optimizer(tc), "freeze": optax.set_to_zero()}, lambda p: param_labels(p, trainable)
    )


def generator_task(
    family: Family,
    tokenizer,
    generator,
    tokenizer_params: Any = None,
    stage: GeneratorStage | None = None,
    start_params: Any = None,
) -> Task:
    """`stage`'s objective (default: the family's first stage) of `generator` on tokenizer ids `[B, L]`; a stage
    with a `start` begins from `start_params`, the previous stage's export. Frozen params get no gradient (stop
    gradient: XLA skips their weight gradients) and no update. Label dropout for classifier-free guidance happens
    inside the models when `train=True` (rng 'dropout')."""
    stage = stage or family.generator_stages()[0]
    init_args = family.generator_inputs(generator)
    if stage.start is not None and start_params is None:
        raise ValueError(f"stage {stage.name!r} starts from the previous stage's params; none were given")

    def init(key):
        params = generator.init(key, *init_args)["params"]
        return (params if stage.start is None else stage.start(params, start_params)), {}

    loss_fn = family_loss = stage.objective(tokenizer, generator)
    if stage.trainable is not train_everything:

        def loss_fn(params, batch, ctx):
            params = {k: v if stage.trainable(k) else jax.lax.stop_gradient(v) for k, v in params.items()}
            return family_loss(params, batch, ctx)

    return Task(stage.name, init, loss_fn, "tokens", frozen=tokenizer_params,
                optimizer=stage_optimizer(stage.trainable))  # fmt: skip


def encode_fn(tokenizer, params) -> Callable[[np.ndarray], np.ndarray]:
    """Images `[B, H, W, 3]` in [-1, 1] -> token ids `[B, L]` int32 (the tokenizer's `encode_ids`), jitted."""
    f = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="encode_ids"))
    return lambda images: np.asarray(f(params, images), np.int32)
