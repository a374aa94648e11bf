"""Official MaskGIT checkpoints (google-research/maskgit) -> jaxgen params.

The releases (`tokenizer_imagenet256_checkpoint`, `maskgit_imagenet256_checkpoint`, and the 512 px pair) are single
files, `flax.serialization.to_bytes({"params": ...})`. jaxgen's `MaskGITVQ` and `MaskedTransformer` use upstream's
Flax names, so conversion is a leaf-for-leaf check: the one rename is the codebook, upstream's `quantizer/codebook`
-> jaxgen's `quantizer/embedding/embedding`. Every size is read off the leaf shapes (`infer_*_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from jaxgen.convert.common import ConversionError, _report
from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.layer_stack import in_layout, unrolled
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig

UPSTREAM_CODEBOOK = "quantizer/codebook"
JAXGEN_CODEBOOK = "quantizer/embedding/embedding"


# ---- reading ------------------------------------------------------------------------------------------------------
def _flat(tree: Mapping) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree), keep_empty_nodes=False).items()}


def read_flax_checkpoint(path: str | Path, prefix: str = "") -> dict[str, np.ndarray]:
    """A Flax msgpack checkpoint (the released format) or an `.npz` with flat keys -> {"a/b/c": array}.

    A leading `params` level is dropped; with `prefix` (e.g. "tokenizer/" in a fixture npz) only keys under it are
    kept, prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    what = f"{path} is not a Flax checkpoint (flax.serialization.to_bytes msgpack, or .npz)"
    npz = path.suffix.lower() == ".npz"
    try:
        if npz:
            with np.load(path) as f:
                tree = {k: f[k] for k in f.files}
        else:
            tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack / zipfile raise several unrelated types on foreign bytes
        raise ConversionError(f"{what}: {type(e).__name__}") from None
    if isinstance(tree, Mapping) and not npz:
        tree = tree.get("params", tree)
    if not isinstance(tree, Mapping):
        raise ConversionError(f"{what}: it holds a {type(tree).__name__}, not a dict of arrays")
    flat = tree if npz else _flat(tree)
    if prefix:
        flat = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    flat = {k.removeprefix("params/"): v for k, v in flat.items()}
    bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
    if not flat or bad:
        where = f" under {prefix!r}" if prefix else ""
        raise ConversionError(f"{what}: " + (f"leaf {bad[0]!r} is not an array" if bad else f"no arrays{where}"))
    return flat


def _rename(path: str) -> str:
    """A leading `params/` dropped, upstream's codebook name mapped to jaxgen's."""
    path = path.removeprefix("params/")
    return JAXGEN_CODEBOOK if path == UPSTREAM_CODEBOOK else path


def _names(shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Leaf path (`_rename`d) -> shape, from arrays, ShapeDtypeStructs or shape tuples."""
    return {_rename(k): tuple(int(d) for d in getattr(v, "shape", v)) for k, v in shapes.items()}


# ---- jaxgen trees ---------------------------------------------------------------------------------------------------
def tokenizer_param_shapes(config: MaskGITVQConfig) -> dict[str, tuple[int, ...]]:
    """The flat param tree of `MaskGITVQ(config)` as shapes (`jax.eval_shape`, nothing allocated)."""
    d = config.downsample
    tree = jax.eval_shape(MaskGITVQ(config).init, jax.random.key(0), jnp.zeros((1, d, d, 3)))["params"]
    return _names(_flat(nn.unbox(tree)))


def _nested_transformer_shapes(config: MaskedConfig):
    """The nested param tree of `MaskedTransformer(config)` as shapes (`jax.eval_shape`, nothing allocated)."""
    ids = jnp.zeros((1, config.seq_len), jnp.int32)
    return nn.unbox(jax.eval_shape(MaskedTransformer(config).init, jax.random.key(0), ids)["params"])


def transformer_param_shapes(config: MaskedConfig) -> dict[str, tuple[int, ...]]:
    """The flat param tree of `MaskedTransformer(config)` as shapes (`jax.eval_shape`, nothing allocated)."""
    return _names(_flat(_nested_transformer_shapes(config)))


# ---- sizes from shapes ----------------------------------------------------------------------------------------------
def _count(shapes, pattern: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def infer_tokenizer_config(shapes: Mapping[str, Any], **overrides) -> MaskGITVQConfig:
    """Read filters, channel multipliers, res blocks, embedding dim and codebook size off a tokenizer's leaf shapes.

    The decoder has one conv per level plus the output conv (`Conv_0` .. `Conv_L`), the encoder (L + 1) *
    num_res_blocks res blocks; level i's width is the output width of its first res block."""
    s = _names(shapes)
    try:
        filters = s["encoder/Conv_0/kernel"][-1]
        levels = _count(s, r"decoder/Conv_(\d+)/") - 1
        blocks = _count(s, r"encoder/ResBlock_(\d+)/")
        res = blocks // (levels + 1) if levels > 0 else 0
        mults = tuple(s[f"encoder/ResBlock_{i * res}/Conv_0/kernel"][-1] // filters for i in range(levels))
        size, dim = s[JAXGEN_CODEBOOK]
    except (KeyError, ValueError) as e:
        raise ConversionError(f"not a MaskGIT tokenizer checkpoint: leaf {e} is missing or mis-shaped") from None
    if levels < 1 or res < 1 or res * (levels + 1) != blocks:
        raise ConversionError(
            f"not a MaskGIT tokenizer checkpoint: {levels + 1} decoder convs and {blocks} encoder res blocks do not "
            f"fit (levels + 1) * num_res_blocks"
        )
    kw = dict(codebook_size=size, embedding_dim=dim, filters=filters, channel_multipliers=mults, num_res_blocks=res)
    return MaskGITVQConfig(**{**kw, **overrides})


def infer_transformer_config(shapes: Mapping[str, Any], codebook_size: int, **overrides) -> MaskedConfig:
    """Read width, layers, heads, MLP width, vocabulary and positions off a transformer's leaf shapes.

    vocab = K + C (+ 1 null class with `class_dropout_prob` > 0) + 1 mask, so C follows from the tokenizer's K;
    num_tokens = position rows - 1 (the class token)."""
    s = _names(shapes)
    attn = "TransformerLayer_0/Attention_0/self_attention/query/kernel"
    try:
        vocab, hidden = s["Embed_0/word_embeddings/embedding"]
        positions = s["Embed_0/position_embeddings/embedding"][0]
        width, heads, head_dim = s[attn]
        mlp = s["TransformerLayer_0/Mlp_0/intermediate_output/kernel"][-1]
    except (KeyError, ValueError) as e:
        raise ConversionError(f"not a MaskGIT transformer checkpoint: leaf {e} is missing or mis-shaped") from None
    if width != hidden or heads * head_dim != hidden:
        raise ConversionError(
            f"{attn} is {(width, heads, head_dim)}: jaxgen needs [hidden, heads, hidden / heads] with hidden {hidden}"
        )
    kw: dict[str, Any] = dict(
        codebook_size=codebook_size,
        num_tokens=positions - 1,
        hidden_size=hidden,
        num_layers=_count(s, r"TransformerLayer_(\d+)/"),
        num_heads=heads,
        intermediate_size=mlp,
    )
    kw.update(overrides)
    extra = 1 + int(kw.get("class_dropout_prob", 0.0) > 0)
    kw.setdefault("num_classes", vocab - kw["codebook_size"] - extra)
    if kw["num_classes"] < 1:
        raise ConversionError(
            f"the transformer's vocabulary has {vocab} rows, too few for the tokenizer's {kw['codebook_size']} codes "
            f"+ classes + mask: the tokenizer is not the one this transformer was trained with"
        )
    return MaskedConfig(**kw)


# ---- conversion -----------------------------------------------------------------------------------------------------
def _convert(flat: Mapping[str, np.ndarray], expected: dict, what: str, hint: str) -> dict:
    got = _names(flat)
    src = {_rename(k): v for k, v in flat.items()}
    missing = [f"{k} {s}" for k, s in expected.items() if k not in got]
    unexpected = [f"{k} {s}" for k, s in got.items() if k not in expected]
    misshaped = [f"{k} {got[k]} (the config needs {s})" for k, s in expected.items() if k in got and got[k] != s]
    if missing or unexpected or misshaped:
        raise ConversionError(_report(what, missing, unexpected, misshaped, hint))
    return traverse_util.unflatten_dict(
        {tuple(k.split("/")): np.ascontiguousarray(src[k], np.float32) for k in expected}
    )


TOKENIZER_SIZES = ("codebook_size", "embedding_dim", "filters", "channel_multipliers", "num_res_blocks")
TRANSFORMER_SIZES = ("num_classes", "num_tokens", "hidden_size", "num_layers", "num_heads", "intermediate_size")


def _hint(infer, shapes, config, fields) -> str:
    """The size fields where the checkpoint (when its sizes can be read) and the config disagree."""
    try:
        found = infer(shapes)
    except (ConversionError, ValueError):
        return ""
    diff = [f"{f}={getattr(found, f)} (config {getattr(config, f)})" for f in fields
            if getattr(found, f) != getattr(config, f)]  # fmt: skip
    return f"the checkpoint's sizes: {', '.join(diff)}" if diff else ""


def convert_tokenizer(flat: Mapping[str, np.ndarray], config: MaskGITVQConfig) -> dict:
    """Tokenizer leaves (upstream names) -> nested float32 `params` of `MaskGITVQ(config)`; one ConversionError
    names every missing, unexpected and mis-shaped leaf."""
    hint = _hint(infer_tokenizer_config, flat, config, TOKENIZER_SIZES)
    return _convert(flat, tokenizer_param_shapes(config), "MaskGIT tokenizer checkpoint", hint)


def convert_transformer(flat: Mapping[str, np.ndarray], config: MaskedConfig) -> dict:
    """Transformer leaves -> nested float32 `params` of `MaskedTransformer(config)` (errors as `convert_tokenizer`)."""
    infer = functools.partial(
        infer_transformer_config, codebook_size=config.codebook_size, class_dropout_prob=config.class_dropout_prob
    )
    hint = _hint(infer, flat, config, TRANSFORMER_SIZES)
    params = _convert(flat, transformer_param_shapes(unrolled(config)), "MaskGIT transformer checkpoint", hint)
    return in_layout(params, config, _nested_transformer_shapes)


# ---- the CLI hook (`python -m jaxgen.convert maskgit ...`) ----------------------------------------------------
def add_convert_arguments(parser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (Flax msgpack, e.g. "
                        "tokenizer_imagenet256_checkpoint, or .npz)")  # fmt: skip
    parser.add_argument("--transformer", required=True, help="transformer checkpoint (Flax msgpack, e.g. "
                        "maskgit_imagenet256_checkpoint, or .npz)")  # fmt: skip
    parser.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")


def _configs_from_file(spec: str) -> tuple[MaskGITVQConfig, MaskedConfig]:
    from jaxgen.config_util import load_config
    from jaxgen.families.base import config_from_dict, plain_section  # here: jaxgen.families imports this module

    cfg = load_config(spec)
    for key in ("vq", "maskgit"):
        if key not in cfg:
            raise ConversionError(f"config {spec} has no `{key}` section (the MaskGIT family needs vq and maskgit)")
    tok = config_from_dict(MaskGITVQConfig, plain_section(cfg.vq), "vq")
    gen = plain_section(cfg.maskgit)
    gen.setdefault("codebook_size", tok.codebook_size)
    return tok, config_from_dict(MaskedConfig, gen, "maskgit")


def convert_checkpoints(args) -> tuple[dict, dict]:
    """`--tokenizer`, `--transformer` [, `--config`] -> ({"vq": params, "maskgit": params}, config.json dict)."""
    tok_flat, tf_flat = read_flax_checkpoint(args.tokenizer), read_flax_checkpoint(args.transformer)
    if getattr(args, "config", ""):
        tok_cfg, tf_cfg = _configs_from_file(args.config)
    else:
        tok_cfg = infer_tokenizer_config(tok_flat)
        tf_cfg = infer_transformer_config(tf_flat, tok_cfg.codebook_size)
        print(f"read off the checkpoints: tokenizer {tok_cfg}\ntransformer {tf_cfg}")
    if tf_cfg.codebook_size != tok_cfg.codebook_size:
        raise ConversionError(
            f"transformer codebook_size {tf_cfg.codebook_size} != tokenizer codebook_size {tok_cfg.codebook_size}: "
            f"the transformer's ids index the tokenizer's codebook; set maskgit.codebook_size = "
            f"{tok_cfg.codebook_size} or use the matching tokenizer"
        )
    params = {"vq": convert_tokenizer(tok_flat, tok_cfg), "maskgit": convert_transformer(tf_flat, tf_cfg)}
    config = {"family": "maskgit", "vq": dataclasses.asdict(tok_cfg), "maskgit": dataclasses.asdict(tf_cfg)}
    return params, config
