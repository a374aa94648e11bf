"""Transformer blocks run as a Python loop or as one scanned layer, optionally rematerialised.

With `scan_layers=False` a model holds its blocks as a list (params `blocks_0 .. blocks_{n-1}`, the upstream names
the converters write) and the loop unrolls at trace time: XLA compiles n copies of the block. With `scan_layers=True`
it holds one block whose params carry a leading `[n]` axis (`blocks`, logical axis 'layers') and `nn.scan` runs it n
times: XLA compiles the block once, whatever the depth (what MaxText does). The outputs are the same.

`run_blocks(body, blocks, x, per_layer, ...)` runs either form: `body(block, x, xs_i) -> (x, y_i)`, with `x` carried
from block to block and `xs_i` / `y_i` one block's inputs and outputs (a KV cache, a drop-path rate). Values the body
closes over (the condition, a static numpy mask, the attention backend) are the same for every block. `remat` picks
what the backward pass keeps of each block (`REMAT_POLICIES`).

Checkpoints, converters and golden checks stay in the unstacked layout; `match_layout(tree, like)` stacks or
unstacks `name_0 .. name_{n-1}` <-> `name` to fit the model a tree is loaded into.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# what the backward pass keeps of a block's activations (the rest is recomputed)
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output (incl. q k^T): recompute the elementwise
    # the weight matmuls' outputs; recompute attention's batched q k^T / p v and the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Body = Callable[[nn.Module, Any, Any], tuple[Any, Any]]


def check_layer_stack(scan_layers: Any, remat: str, where: str) -> None:
    """ValueError naming `where` (e.g. "NextScaleConfig") when the two config fields are not valid."""
    if not isinstance(scan_layers, bool):
        raise ValueError(f"{where}.scan_layers={scan_layers!r} must be True or False")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{where}.remat={remat!r} is not one of {sorted(REMAT_POLICIES)}")


def make_blocks(make_block: Callable[[int], nn.Module], n: int, scan_layers: bool) -> list[nn.Module] | nn.Module:
    """In a `setup`: the n blocks `make_block(i)` (a list: params `<attr>_i`), or with `scan_layers` the one block
    `make_block(0)` whose params `run_blocks` stacks on a leading `[n]` axis (params `<attr>`). Per-block settings
    (drop-path rates) must then reach the body as per-layer inputs, not as attributes."""
    return make_block(0) if scan_layers else [make_block(i) for i in range(n)]


def run_blocks(
    body: Body,
    blocks: Sequence[nn.Module] | nn.Module,
    x: Any,
    per_layer: Any = None,
    *,
    length: int,
    remat: str = "none",
) -> tuple[Any, Any]:
    """Run `body(block, x, xs_i) -> (x, y_i)` over `length` blocks. Returns (the last x, the y's).

    Unrolled (`blocks` a list): `per_layer` is None or a sequence of `length` per-block inputs, the y's a list.
    Scanned (`blocks` one module): `per_layer` is None or a pytree whose leaves have a leading `[length]` axis, the
    y's are stacked the same way. Every block draws its own 'params' and 'dropout' keys in both forms."""
    if length == 0:
        return x, ([] if isinstance(blocks, (list, tuple)) else None)
    policy = REMAT_POLICIES[remat]
    fn = body if remat == "none" else nn.remat(body, policy=policy, prevent_cse=isinstance(blocks, (list, tuple)))
    if isinstance(blocks, (list, tuple)):
        ys = []
        for i, block in enumerate(blocks):
            x, y = fn(block, x, None if per_layer is None else per_layer[i])
            ys.append(y)
        return x, ys
    scanned = nn.scan(
        fn,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        out_axes=0,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(blocks, x, per_layer)


def per_layer_values(values: np.ndarray, scan_layers: bool) -> Any:
    """Per-block constants (e.g. drop-path rates `[n]`) in `run_blocks`' per-layer form: python floats for the loop
    (so a zero stays static), an array for the scan."""
    return jnp.asarray(values, jnp.float32) if scan_layers else [float(v) for v in values]


# ---- the param layout at the boundary ------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def stack_layers(tree: Mapping, name: str) -> dict:
    """`name_0 .. name_{n-1}` (consecutive, the same structure) -> `name` with every leaf stacked on a new axis 0."""
    tree = dict(tree)
    n = 0
    while f"{name}_{n}" in tree:
        n += 1
    if n == 0:
        raise KeyError(f"no {name}_0 to stack")
    layers = [tree.pop(f"{name}_{i}") for i in range(n)]
    tree[name] = jax.tree.map(lambda *a: np.stack([np.asarray(v) for v in a]), *layers)
    return tree


def unstack_layers(tree: Mapping, name: str) -> dict:
    """`name` with leaves `[n, ...]` -> `name_0 .. name_{n-1}`."""
    tree = dict(tree)
    stacked = tree.pop(name)
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        tree[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return tree


def match_layout(tree: Any, like: Any) -> Any:
    """`tree` (nested dicts of arrays) with its block stacks in the layout of `like` (a tree of the same model's
    params or shapes): `blocks_0 ..` stacked into `blocks` where `like` has `blocks`, or unstacked the other way.
    Everything else is returned as it is, so a tree that does not fit still fails the caller's shape check."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    out = dict(tree)
    for key in like:
        if key in out:
            continue
        if f"{key}_0" in out:  # like scans, tree is unrolled
            out = stack_layers(out, key)
            continue
        m = _NUMBERED.match(key)
        if m and m.group(1) in out and m.group(1) not in like:  # like is unrolled, tree scanned
            out = unstack_layers(out, m.group(1))
    return {k: match_layout(v, like[k]) if k in like else v for k, v in out.items()}


def unrolled(config: Any) -> Any:
    """`config` (a generator config dataclass) with `scan_layers` off: the layout converters and checkpoints use."""
    return dataclasses.replace(config, scan_layers=False) if getattr(config, "scan_layers", False) else config


def in_layout(params: Any, config: Any, param_shapes: Callable[[Any], Any]) -> Any:
    """Unrolled `params` in the layout of `config` (`param_shapes(config)`: its nested param tree, shapes only)."""
    return match_layout(params, param_shapes(config)) if getattr(config, "scan_layers", False) else params
