"""Abstract trees with logical-axis boxes -> `NamedSharding` trees; models born sharded; batches as global arrays.

The models' initialisers box each param in `nn.LogicallyPartitioned` only inside `keep_logical_boxes()` (elsewhere
`module.init` returns plain arrays, which the converters and tests rely on). So build abstract trees with
`abstract_boxed(fn, *args)` (or `abstract_boxed_params`), not a bare `jax.eval_shape`:

    def init_state(key):
        params = model.init(key, *init_args)["params"]          # boxed inside keep_logical_boxes()
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract = abstract_boxed(init_state, key)                   # optax keeps the boxes on mu / nu
    shardings = tree_shardings(abstract, mesh, rules)            # structure of the UNBOXED state
    state = init_sharded(init_state, mesh, rules, key)           # = jit(unbox . init_state, out_shardings=...)
    with activation_rules(mesh, rules):                          # activations' logical constraints
        step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(...)), out_shardings=...)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.parallel.logical import keep_logical_boxes
from jaxgen.parallel.rules import DEFAULT_RULES, Rules

__all__ = [
    "abstract_boxed",
    "abstract_boxed_params",
    "activation_rules",
    "batch_sharding",
    "fit_spec",
    "init_sharded",
    "keep_logical_boxes",
    "shard_batch",
    "strip_boxes",
    "tree_shardings",
]


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def abstract_boxed(fn: Callable, *args, **kwargs) -> Any:
    """`jax.eval_shape(fn, *args)` with the models' params boxed with their logical axis names."""
    with keep_logical_boxes():
        return jax.eval_shape(functools.partial(fn, **kwargs), *args)


def abstract_boxed_params(module: nn.Module, *init_args, **init_kwargs) -> Any:
    """The abstract `module.init(*init_args)["params"]` (ShapeDtypeStructs), each in its `LogicallyPartitioned` box."""
    return abstract_boxed(lambda *a: module.init(*a, **init_kwargs)["params"], *init_args)


def strip_boxes(tree: Any) -> Any:
    """The tree with every box replaced by its value (no sharding constraint applied, unlike `nn.unbox` under a
    mesh)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with, per dimension, the mesh axes that do not divide it dropped (greedily, in order): a dimension of
    3 on fsdp=2 becomes replicated, a batch of 6 on ('data', 'fsdp') = (2, 2) is split over 'data' only."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the array has dimensions {tuple(shape)}")
    sizes = dict(mesh.shape)
    out = []
    for dim, entry in zip(shape, entries + (None,) * (len(shape) - len(entries)), strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, split = [], 1
        for axis in axes:
            if dim % (split * sizes[axis]) == 0:
                kept.append(axis)
                split *= sizes[axis]
        out.append(None if not kept else kept[0] if isinstance(entry, str) else tuple(kept))
    return PartitionSpec(*out)


def _leaf_sharding(x: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding of one leaf or box. A box's value is mapped as a tree: optax's masking puts an empty
    `MaskedNode()` in a box, which must stay an empty node to match the unboxed state. A boxed value with fewer
    dimensions than names (optax state derived from a param by a shape-changing tree_map, e.g. Adafactor's factored
    moments) is replicated: its names no longer say which dimension is which."""
    if isinstance(x, nn.LogicallyPartitioned):
        spec, value = nn.logical_to_mesh_axes(x.names, rules), x.value
    elif isinstance(x, nn.Partitioned):  # names are mesh axes already
        spec, value = x.get_partition_spec(), x.value
    else:
        spec, value = PartitionSpec(), x

    def one(v):
        shape = tuple(getattr(v, "shape", ()))
        return NamedSharding(mesh, fit_spec(spec, shape, mesh) if len(spec) == len(shape) else PartitionSpec())

    return jax.tree.map(one, value)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A `NamedSharding` per leaf, in the structure of the UNBOXED tree: boxed leaves by their logical names and
    `rules` (mesh axes that do not divide a dimension dropped, see `fit_spec`), other leaves replicated. Works for
    any tree: params, an optax state built from boxed params, a whole train state.

    Raises when the tree has leaves but no box at all: it was almost surely built outside `keep_logical_boxes()`
    (use `abstract_boxed`), and every leaf would silently be replicated."""
    leaves = jax.tree.leaves(abstract_tree, is_leaf=_is_box)
    if leaves and not any(_is_box(x) for x in leaves):
        raise ValueError(
            "tree_shardings: no leaf carries logical axis names; build the abstract tree with "
            "jaxgen.parallel.partition.abstract_boxed(fn, *args) (jax.eval_shape inside keep_logical_boxes())"
        )
    return jax.tree.map(lambda x: _leaf_sharding(x, mesh, rules), abstract_tree, is_leaf=_is_box)


def _compile_options() -> dict | None:
    # As jaxgen.models.registry.init_params: initialisers run once, XLA's CPU optimisation passes cost more than
    # they save (and the same options give the same numbers as that unsharded init).
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def init_sharded(fn: Callable, mesh: Mesh, rules: Rules, *args) -> Any:
    """`fn(*args)` (e.g. params or a train state from a key) computed by one jit whose outputs are born sharded as
    the boxes say: nothing is materialised whole on one device. Returns plain (unboxed) arrays; same values as an
    unsharded `fn` (the RNG is partitionable)."""
    with keep_logical_boxes():
        shardings = tree_shardings(jax.eval_shape(fn, *args), mesh, rules)
        lowered = jax.jit(lambda *a: strip_boxes(fn(*a)), out_shardings=shardings).lower(*args)
    return lowered.compile(_compile_options())(*args)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Context for tracing sharded computations: `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, so the
    models' `constrain(x, names)` calls become sharding constraints (outside it they are no-ops)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 1) -> NamedSharding:
    """Sharding of an `ndim`-dimensional array whose leading axis is the batch (the 'batch' rule), rest replicated."""
    if ndim < 1:
        raise ValueError("batch_sharding: a batched array has at least one dimension")
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules))


def _local_batch_shards(mesh: Mesh, entry: Any) -> int:
    """How many distinct slices of the batch this process's devices hold."""
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    pos = [mesh.axis_names.index(a) for a in axes]
    me = jax.process_index()
    return len({tuple(c[i] for i in pos) for c, d in np.ndenumerate(mesh.devices) if d.process_index == me})


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Per-process numpy batch tree (leading axis: this process's examples) -> global `jax.Array`s split over the
    batch mesh axes (`jax.make_array_from_process_local_data`; the global batch is the processes' batches stacked)."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, rules, x.ndim)
        shards = _local_batch_shards(mesh, sharding.spec[0])
        if x.shape[0] % shards:
            raise ValueError(
                f"shard_batch: this process's batch of {x.shape[0]} does not split into its {shards} batch shards "
                f"(mesh {dict(mesh.shape)}, batch split over {sharding.spec[0]})"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)
