"""The official Axial Transformer's TF variables (google-research `axial/`) -> jaxgen params.

    python -m jaxgen.convert axial --weights axial_vars.npz --num-heads 16 --out ckpt/axial_imagenet32
    python -m jaxgen.convert axial --weights model.ckpt-250000 --config configs/axial_imagenet.py:imagenet32 --out ...

Names map one to one: `transformer2d/<path>` (the one-channel model) and `ar_decoder/transformer2d/<path>` (the
channel-at-a-time model) -> params["transformer2d"][<path>]; `ar_decoder/<path>` (its conditioning stack:
`pos_embs_h`, `pos_embs_w`, `exterior_input_conv`, `exterior_row_i`, `exterior_col_i`) -> params[<path>]. Leaves: a
Dense or conv `w` -> `kernel` (the same layouts: [in, out], HWIO), `b` -> `bias`; a LayerNorm `g` -> `scale`, `b` ->
`bias`; `embs`, `pos_embs_h`, `pos_embs_w` keep their names.

A training checkpoint holds each variable and its `<name>/ExponentialMovingAverage`, which upstream's evaluation
scores: the EMA copies are taken when present (`--no-ema`: the raw ones; upstream averages every trainable variable,
so EMA copies for only some of them are an error). `global_step`, Adam's slots and its beta powers are not model
variables. Every size is read off the shapes except the number of heads (q is a [D, D] kernel): give `--num-heads` or
a `--config` (its axial section, whose sizes must be the variables'). Names and shapes are checked against the model
before anything is converted, each problem kind in one line (how many, and the first few names).

Reading a TF checkpoint needs TensorFlow, which jaxgen does not depend on; without it, dump the variables to an npz
once (on any machine with TensorFlow) and convert that:

    import numpy as np, tensorflow as tf
    reader = tf.train.load_checkpoint("model.ckpt-250000")
    names = reader.get_variable_to_shape_map()
    np.savez("axial_vars.npz", **{name: reader.get_tensor(name) for name in names})
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from jaxgen.models.generators.axial import AxialConfig, AxialTransformer
from jaxgen.models.tokenizers.pixels import PixelConfig

EMA_SUFFIX = "/ExponentialMovingAverage"
NOT_MODEL = re.compile(r"(^|/)(global_step|beta1_power|beta2_power)$|/Adam(_\d+)?$")
SCOPES = ("transformer2d", "ar_decoder")
_DENSE_LEAF = {"w": "kernel", "b": "bias"}
_NORM_LEAF = {"g": "scale", "b": "bias"}
_TABLES = ("embs", "pos_embs_h", "pos_embs_w")
_SIZES = ("height", "width", "hidden_size", "mlp_factor", "num_outer_layers", "num_inner_layers")


def read_variables(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array from an `.npz` (keys may carry an `axial/` prefix, as the fixtures do), or a TF checkpoint: its
    prefix (`model.ckpt-250000`, beside `.index`) or its directory (the latest one), which needs TensorFlow."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--weights {path}: no such file")
        with np.load(path) as f:
            return {k.removeprefix("axial/"): np.asarray(f[k]) for k in f.files}
    tf_dir = path.is_dir() and (path / "checkpoint").is_file()
    if not (tf_dir or Path(f"{path}.index").is_file()):
        raise ValueError(f"--weights {path}: neither an .npz nor a TF checkpoint (no {path}.index, no checkpoint "
                         f"directory)")  # fmt: skip
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ValueError(
            f"--weights {path} is a TF checkpoint, and reading one needs tensorflow, which is not installed: dump it "
            "to an .npz with the snippet in jaxgen/convert/axial.py's docstring and pass that"
        ) from e
    reader = tf.train.load_checkpoint(str(path))
    return {name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}


def model_variables(arrays: Mapping[str, np.ndarray], ema: bool = True) -> dict[str, np.ndarray]:
    """The model's variables: optimizer slots and `global_step` dropped, each EMA copy in place of its variable
    (unless `ema` is False, then the raw ones)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if NOT_MODEL.search(name):
            continue
        if name.endswith(EMA_SUFFIX):
            if ema:
                out[name.removesuffix(EMA_SUFFIX)] = value
            continue
        if ema and f"{name}{EMA_SUFFIX}" in arrays:
            continue
        out[name] = value
    raw = sorted(n for n in out if f"{n}{EMA_SUFFIX}" not in arrays)
    if ema and len(raw) < len(out) and raw:  # upstream averages every trainable variable: a mix is a damaged file
        raise ValueError(f"axial variables: {len(out) - len(raw)} have an ExponentialMovingAverage copy but {len(raw)} "
                         f"do not ({', '.join(raw[:3])}{', ...' if len(raw) > 3 else ''}): pass --no-ema for the "
                         f"raw variables")  # fmt: skip
    return out


def model_scope(names) -> str:
    """ "transformer2d" (one channel) or "ar_decoder" (several), the variables' top-level scope."""
    scopes = {n.split("/", 1)[0] for n in names}
    if len(scopes) != 1 or not scopes <= set(SCOPES):
        raise ValueError(f"axial variables: expected every name under one of {SCOPES}, got the scopes "
                         f"{sorted(scopes)[:6]}")  # fmt: skip
    return scopes.pop()


def param_path(name: str) -> tuple[str, ...]:
    """A TF variable name -> its jaxgen param path."""
    parts = name.split("/")[1:]  # drop the top-level scope
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in _TABLES and len(parts) <= 2:
        return tuple(parts)
    norm = parent.startswith("layernorm") or parent == "final_ln"
    table = _NORM_LEAF if norm else _DENSE_LEAF
    if leaf not in table:
        raise ValueError(f"axial variable {name!r}: unknown leaf {leaf!r}")
    return (*parts[:-1], table[leaf])


def tf_name(path: tuple[str, ...], scope: str) -> str:
    """The inverse of `param_path`."""
    *parents, leaf = path
    return "/".join((scope, *parents, {"kernel": "w", "bias": "b", "scale": "g"}.get(leaf, leaf)))


def _layer_count(names, prefix: str) -> int:
    return len({m.group(0) for n in names if (m := re.search(rf"/{prefix}_\d+/", n))})


def infer_axial_config(shapes: Mapping[str, tuple[int, ...]], num_heads: int, **overrides) -> AxialConfig:
    """The model's sizes read off the variable shapes (`num_heads` cannot be: q is [D, D])."""
    scope = model_scope(shapes)
    two_d = "transformer2d" if scope == "transformer2d" else "ar_decoder/transformer2d"
    try:
        num_values, d = shapes[f"{two_d}/embs"]
        height = shapes[f"{two_d}/pos_embs_h"][0]
        width = shapes[f"{two_d}/pos_embs_w"][0]
        hidden = shapes[f"{two_d}/outer_row_0/mlp/proj_in/w"][1] if f"{two_d}/outer_row_0/mlp/proj_in/w" in shapes \
            else shapes[f"{two_d}/inner_row_0/mlp/proj_in/w"][1]  # fmt: skip
        channels = shapes["ar_decoder/exterior_input_conv/w"][2] // 2 if scope == "ar_decoder" else 1
    except KeyError as e:
        raise ValueError(f"axial variables: {e.args[0]!r} is missing, so the model's size cannot be read") from e
    if num_values != 256:
        raise ValueError(f"axial variables: embs has {num_values} rows; jaxgen's model is for 8-bit pixels (256)")
    if hidden % d:
        raise ValueError(f"axial variables: mlp/proj_in has {hidden} outputs, not a multiple of the width {d}")
    kw = dict(
        height=height,
        width=width,
        channels=channels,
        hidden_size=d,
        num_heads=num_heads,
        mlp_factor=hidden // d,
        num_outer_layers=_layer_count(shapes, "outer_row") + _layer_count(shapes, "outer_col"),
        num_inner_layers=_layer_count(shapes, "inner_row"),
        num_exterior_layers=_layer_count(shapes, "exterior_row") + _layer_count(shapes, "exterior_col"),
        num_classes=0,
    )
    return AxialConfig(**(kw | overrides))


def expected_variables(config: AxialConfig) -> dict[str, tuple[int, ...]]:
    """TF name -> shape of every variable upstream creates for `config` (unconditional: no class table)."""
    if config.num_classes:
        raise ValueError("the official model is unconditional: convert into a config with num_classes=0")
    model = AxialTransformer(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())["params"]
    scope = "transformer2d" if config.channels == 1 else "ar_decoder"
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(p.key for p in path)
        if scope == "transformer2d":
            keys = keys[1:]  # params["transformer2d"][...] <- transformer2d/...
        out[tf_name(keys, scope)] = tuple(leaf.shape)
    return out


def check_variable_list(shapes: Mapping[str, tuple[int, ...]], config: AxialConfig) -> None:
    """One ValueError naming what is missing, unexpected or mis-shaped against the model `config` builds."""
    want = expected_variables(config)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{n}: {list(shapes[n])} (model: {list(want[n])})" for n in sorted(set(want) & set(shapes))
             if tuple(shapes[n]) != want[n]]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})")
    if wrong:
        problems.append(f"{len(wrong)} with another shape ({'; '.join(wrong[:3])})")
    if problems:
        raise ValueError(
            f"axial variables do not fit the model ({config.channels} channel(s), {config.height} x {config.width}, "
            f"D {config.hidden_size}): {'; '.join(problems)}. Check the file, --num-heads / --config, and --no-ema"
        )


def convert_variables(variables: Mapping[str, np.ndarray], config: AxialConfig) -> dict:
    """Checked TF variables -> the jaxgen param tree of `AxialTransformer(config)` (float32)."""
    check_variable_list({k: tuple(v.shape) for k, v in variables.items()}, config)
    params: dict = {}
    for name, value in variables.items():
        path = param_path(name)
        if name.startswith("transformer2d/"):
            path = ("transformer2d", *path)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value, np.float32)
    return params


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="the variables: an .npz (name -> array) or a TF checkpoint prefix")
    p.add_argument("--num-heads", type=int, default=0, help="attention heads (not readable off the shapes)")
    p.add_argument("--config", default="", help="configs/NAME.py:variant: its axial section (heads, dropout, ...)")
    p.add_argument("--no-ema", action="store_true", help="the raw variables, not their ExponentialMovingAverage")


def config_from_spec(spec: str, shapes: Mapping[str, tuple[int, ...]], num_heads: int = 0) -> AxialConfig:
    """The model of a config file (`configs/axial_imagenet.py:imagenet32`): its axial section (heads, dropout,
    initialiser scales, backend, ...) over the sizes read off the variables, which must agree with it."""
    from jaxgen.config_util import load_config
    from jaxgen.families.base import config_from_dict, plain_section

    cfg = load_config(spec)
    section = plain_section(cfg.axial)
    if not section.get("num_heads"):
        raise ValueError(f"--config {spec}: its axial section has no num_heads")
    if num_heads and num_heads != section["num_heads"]:
        raise ValueError(f"--num-heads {num_heads} but --config {spec} has axial.num_heads={section['num_heads']}: "
                         f"pass one of them")  # fmt: skip
    read = infer_axial_config(shapes, num_heads=int(section["num_heads"]))
    section.setdefault("channels", plain_section(cfg.get("pixels", {})).get("channels", read.channels))
    sizes = (*_SIZES, "channels") + (("num_exterior_layers",) if read.channels > 1 else ())
    differ = [f"axial.{k}={section[k]} (the variables: {getattr(read, k)})" for k in sizes
              if k in section and section[k] != getattr(read, k)]  # fmt: skip
    if differ:
        raise ValueError(f"--config {spec} is another model than the variables: {'; '.join(differ)}")
    return config_from_dict(AxialConfig, dataclasses.asdict(read) | section, "axial")


def convert_checkpoint(args: argparse.Namespace) -> tuple[dict, dict]:
    """-> ({"pixels": {}, "axial": params}, {"family": "axial", "pixels": ..., "axial": ...})."""
    variables = model_variables(read_variables(args.weights), ema=not args.no_ema)
    shapes = {k: tuple(v.shape) for k, v in variables.items()}
    if args.config:
        config = config_from_spec(args.config, shapes, args.num_heads)
    elif args.num_heads > 0:
        config = infer_axial_config(shapes, num_heads=args.num_heads)
    else:
        raise ValueError("the number of heads cannot be read off the variables: pass --num-heads N or --config")
    print(f"read off the variables: {config}")
    params = convert_variables(variables, config)
    pixels = dataclasses.asdict(PixelConfig(channels=config.channels))
    meta = {"family": "axial", "pixels": pixels, "axial": dataclasses.asdict(config)}
    return {"pixels": {}, "axial": params}, meta
