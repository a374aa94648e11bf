"""Logical axis names -> mesh axes, as data.

Models name every dimension of their params and of the main activations with a logical axis name
(`jaxgen.models.layers.logical` / `constrain`); a rule table maps each name to a mesh axis of
`('data', 'fsdp', 'tensor')`, a tuple of them, or None (replicated). The run config carries the table as
`cfg.parallel.rules`, a list of `[logical, mesh]` pairs; `rules_from_config` turns it back into tuples.

Rules are read in order and an array never uses a mesh axis twice (Flax's `logical_to_mesh_axes`): an activation
`('batch', 'length', 'embed')` gets `batch -> ('data', 'fsdp')` first, so its 'embed' dimension, whose rule also
wants 'fsdp', stays replicated, while a kernel `('embed', 'mlp')` is sharded `('fsdp', 'tensor')`. That is FSDP: the
weights are split over 'fsdp' at rest and gathered for the matmul, the activations are split over the batch.

Logical names used by the models:

  batch       leading batch dimension of activations and data                     -> ('data', 'fsdp')
  length      token positions (activations; VAR's pos_start / pos_1LC tables)     -> replicated
  heads       attention heads, or heads * head_dim flattened (q / v biases, the   -> 'tensor'
              attention output projection's input, VAR's per-head scale)
  kv          head_dim of q / k / v activations                                   -> replicated
  qkv         packed q | k | v projection output (mat_qkv, wqkv)                  -> 'tensor'
  mlp         FFN hidden width                                                    -> 'tensor'
  vocab       token vocabulary (output head, LlamaGen's token embedding, logits)  -> 'tensor'
  embed       transformer width C (params)                                        -> 'fsdp'
  adaln       AdaLN modulation outputs (VAR's ada_lin: 6C or 2C)                  -> 'tensor'
  norm        norm scales / biases                                                -> replicated
  classes     class-embedding rows                                                -> replicated
  scales      VAR's per-scale embedding rows                                      -> replicated
  latent      tokenizer code width (codebooks, VAR's word_embed input)            -> replicated
  codebook    codebook rows                                                       -> replicated
  conv_h, conv_w, conv_in                                                         -> replicated
  conv_out    conv output channels (kernels, biases; feature-map channels)        -> 'fsdp'
  height, width   feature-map spatial dimensions                                  -> replicated
  layers      the stacked block axis of a scanned generator (`scan_layers`)      -> replicated

`qkv -> 'tensor'` splits the packed projection in contiguous chunks that do not follow the q / k / v boundaries
(the parameter layout is fixed by the checkpoints), so the partitioner reshuffles the heads after it; set
`('qkv', None)` to replicate it over 'tensor' instead. A mesh axis that does not divide a parameter dimension is
dropped for that dimension (`jaxgen.parallel.partition.fit_spec`): a conv with 3 output channels stays replicated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("adaln", "tensor"),
    ("norm", None),
    ("classes", None),
    ("scales", None),
    ("latent", None),
    ("codebook", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("height", None),
    ("width", None),
    ("layers", None),
)


def _mesh_axes(logical: str, value: Any) -> MeshAxes:
    if value is None or isinstance(value, str):
        axes: tuple = () if value is None else (value,)
    elif isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        axes = tuple(value)
    else:
        raise ValueError(f"rule {logical!r}: mesh axes must be None, a name or a list of names, got {value!r}")
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"rule {logical!r}: unknown mesh axes {unknown}; the mesh has {MESH_AXES}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"rule {logical!r}: mesh axis repeated in {value!r}")
    return value if value is None or isinstance(value, str) else axes


def rules_from_config(seq: Iterable[Any]) -> Rules:
    """`cfg.parallel.rules` (a list of `[logical, mesh]` pairs, lists for tuples) -> a checked rule table."""
    rules = []
    for pair in seq:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"a rule is a [logical name, mesh axes] pair, got {pair!r}")
        rules.append((pair[0], _mesh_axes(pair[0], pair[1])))
    return tuple(rules)


def rules_to_config(rules: Rules = DEFAULT_RULES) -> list[list[Any]]:
    """A rule table as plain lists, for a config file: `cfg.parallel.rules = rules_to_config()`."""
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]
