"""What every class-conditional sampler shares: label checks and one jitted entry point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_labels(labels, num_classes: int, allow_null: bool = True) -> None:
    """Raise a clear error for class labels outside [0, num_classes) (or == num_classes, the null class)."""
    labels = np.asarray(labels)
    hi = num_classes if allow_null else num_classes - 1
    if labels.ndim != 1:
        raise ValueError(f"class labels must be a 1-D sequence [B], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > hi):
        null = f", plus the null class {num_classes}" if allow_null else ""
        raise ValueError(f"class labels must be in [0, {hi}] ({num_classes} classes{null}); "
                         f"got min {labels.min()} max {labels.max()}")  # fmt: skip


class ClassConditionalSampler:
    """`sampler(generator_params, tokenizer_params, labels, key) -> sample`: `sample_fn(generator, tokenizer,
    settings, generator_params, tokenizer_params, labels [B], key)` jitted once per batch size, labels checked on
    the host first."""

    def __init__(self, sample_fn: Callable, generator, tokenizer, settings, num_classes: int):
        self.generator, self.tokenizer, self.settings = generator, tokenizer, settings
        self.num_classes = num_classes
        self._fn = jax.jit(lambda gp, tp, labels, key: sample_fn(generator, tokenizer, settings, gp, tp, labels, key))

    def __call__(self, generator_params, tokenizer_params, labels: Sequence[int] | jax.Array, key: jax.Array) -> Any:
        check_labels(labels, self.num_classes, allow_null=True)
        return self._fn(generator_params, tokenizer_params, jnp.asarray(labels, jnp.int32), key)

    def lower(self, generator_params, tokenizer_params, labels, key):
        """AOT lowering, e.g. `.lower(...).compile()` to measure or cache the compile."""
        return self._fn.lower(generator_params, tokenizer_params, jnp.asarray(labels, jnp.int32), key)
