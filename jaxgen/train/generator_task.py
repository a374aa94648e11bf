"""The generator stage's `Task`: the family's objective on token ids written once by the tokenizer
(`encode_fn`), with the tokenizer's params frozen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxgen.families.base import Family
from jaxgen.train.task import Task


def generator_task(family: Family, tokenizer, generator, tokenizer_params: Any = None) -> Task:
    """`family.objective` of `generator` on tokenizer ids `[B, L]`. Label dropout for classifier-free guidance
    happens inside the models when `train=True` (rng 'dropout')."""
    init_args = family.generator_inputs(generator)

    def init(key):
        return generator.init(key, *init_args)["params"], {}

    return Task("generator", init, family.objective(tokenizer, generator), "tokens", frozen=tokenizer_params)


def encode_fn(tokenizer, params) -> Callable[[np.ndarray], np.ndarray]:
    """Images `[B, H, W, 3]` in [-1, 1] -> token ids `[B, L]` int32 (the tokenizer's `encode_ids`), jitted."""
    f = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="encode_ids"))
    return lambda images: np.asarray(f(params, images), np.int32)
