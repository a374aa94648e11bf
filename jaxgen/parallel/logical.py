"""Logical axis names on parameters and activations (the lowest floor of the sharding machinery).

Every parameter initialiser is wrapped in `logical(init, names)` (one logical axis name per dimension, mapped to
mesh axes by the rule table in `jaxgen.parallel.rules`). `module.init` returns plain arrays unless called inside
`keep_logical_boxes()`, where each param comes boxed in `nn.LogicallyPartitioned` (what `jaxgen.parallel.partition`
reads to build shardings). The values are the same either way. `constrain` is the activation-side hint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

# Whether initialisers return `nn.LogicallyPartitioned` boxes. A jit cache key (a `jax.make_user_context`), so a
# function traced outside the context is re-traced inside it rather than reused without its boxes.
_KEEP_BOXES = jax.make_user_context(default_value=False)


def keep_logical_boxes(enabled: bool = True):
    """Context manager: inside it, initialisers wrapped by `logical` box their params with logical axis names."""
    return _KEEP_BOXES(enabled)


def logical(init: Callable, names: Sequence[str | None]) -> Callable:
    """`init` whose value carries one logical axis name per dimension (boxed only inside `keep_logical_boxes()`)."""
    names = tuple(names)
    boxed = nn.with_logical_partitioning(init, names)

    def wrapped(*args, **kwargs):
        if not _KEEP_BOXES.value:
            return init(*args, **kwargs)
        box = boxed(*args, **kwargs)
        if box.value.ndim != len(names):
            raise ValueError(f"logical axis names {names} do not fit a parameter of shape {box.value.shape}")
        return box

    return wrapped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`nn.with_logical_constraint(x, names)`: a sharding hint for an activation; a no-op unless logical axis rules
    (`nn.logical_axis_rules`) and a mesh (`jax.set_mesh`) are both set."""
    return nn.with_logical_constraint(x, tuple(names))
