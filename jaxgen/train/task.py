"""`Task`: what a train stage optimises. The loop in `jaxgen.train.loop` runs any task the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from jaxgen.train.optim import make_optimizer
from jaxgen.train.step import LossFn


def _ema_params(state) -> Any:
    return state.ema_params


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # "tokenizer" | "generator": the stage, its workdir sub-folder and its metrics' tag
    # key -> (params, model_state). Params may carry logical-axis boxes (the loop builds shardings from them);
    # model_state: variables updated without gradients ({} when none), replicated.
    init: Callable[[Any], tuple[Any, Any]]
    loss_fn: LossFn
    batch_key: str  # "image" (tokenizer) or "tokens" (generator): the batch field the stage reads
    frozen: Any = None  # params every step reads but does not train (replicated), e.g. the tokenizer, LPIPS
    optimizer: Callable[[Any], optax.GradientTransformation] = make_optimizer  # train section -> optimizer
    export: Callable[[Any], Any] = _ema_params  # train state -> the params that samplers / encoders use
