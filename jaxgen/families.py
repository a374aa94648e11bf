"""Model families: how a run config's sections become a (tokenizer, generator) pair, their init inputs and their
sampler. The binaries (`jaxgen.sample`, later `jaxgen.main`) and the converters look families up here by
`config.family`, so adding a family touches this table, not the binaries."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.models.registry import build_llamagen, build_titok, build_var, init_params
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling


@dataclasses.dataclass(frozen=True)
class Family:
    tokenizer: str  # config section and checkpoint key of the tokenizer ("vae", "vq")
    generator: str  # ... and of the generator ("var", "gpt")
    build: Callable[[Any, Any], tuple[Any, Any]]  # (tokenizer section, generator section) -> (tokenizer, generator)
    init_inputs: Callable[[Any, Any], tuple[tuple, tuple]]  # -> (tokenizer init args, generator init args)
    sampler: Callable[[Any, Any, dict], Any]  # (generator, tokenizer, sampling section) -> sampler
    objective: str  # the generator's training objective: "next_scale" | "next_token"
    # (tokenizer, generator or None in a tokenizer-only run, image size) -> raise ValueError when they do not fit
    check_image_size: Callable[[Any, Any, int], None]


def _var_inputs(vae, var):
    s = vae.config.image_size
    c = var.config
    return (jnp.zeros((1, s, s, 3)),), (jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - c.first_l, c.z_channels)))


def _llamagen_inputs(vq, gpt):
    s = 2 * vq.config.downsample
    return (jnp.zeros((1, s, s, 3)),), (
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, gpt.config.block_size - 1), jnp.int32),
    )


def _check_var_size(vae, var, size: int) -> None:
    c = vae.config
    if size != c.image_size:
        raise ValueError(
            f"data.image_size={size} does not fit the tokenizer: patch_nums[-1]={c.patch_nums[-1]} x "
            f"downsample {c.downsample} (2^(len(ch_mult)-1)) = {c.image_size} px. Set data.image_size="
            f"{c.image_size} or change vae.patch_nums / vae.ch_mult."
        )


def _check_llamagen_size(vq, gpt, size: int) -> None:
    d = vq.config.downsample
    grid = size // d
    if gpt is None:  # a tokenizer-only run
        if size % d:
            raise ValueError(
                f"data.image_size={size} is not a multiple of the VQ's downsampling {d} (2^(len(ch_mult)-1))"
            )
        return
    if size % d or grid * grid != gpt.config.block_size:
        raise ValueError(
            f"data.image_size={size} does not fit the tokenizer/generator: the VQ downsamples by {d} "
            f"(2^(len(ch_mult)-1)), so a {size}px image is {size / d:g}x{size / d:g} tokens, but gpt.block_size="
            f"{gpt.config.block_size}. Use an image size that is a multiple of {d} with (size/{d})^2 == "
            f"gpt.block_size."
        )


def _titok_inputs(titok, gpt):
    s = titok.config.image_size
    return (jnp.zeros((1, s, s, 3)),), (
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, gpt.config.block_size - 1), jnp.int32),
    )


def _check_titok_size(titok, gpt, size: int) -> None:
    if size != titok.config.image_size:
        raise ValueError(
            f"data.image_size={size} does not fit the tokenizer: titok.image_size={titok.config.image_size}. Set "
            f"one to the other."
        )


def _next_token_sampler(gen, tok, s):
    return NextTokenSampler(gen, tok, NextTokenSampling(**s))


FAMILIES: dict[str, Family] = {
    "var": Family("vae", "var", build_var, _var_inputs,
                  lambda gen, tok, s: NextScaleSampler(gen, tok, NextScaleSampling(**s)),
                  "next_scale", _check_var_size),
    "llamagen": Family("vq", "gpt", build_llamagen, _llamagen_inputs, _next_token_sampler,
                       "next_token", _check_llamagen_size),
    "titok": Family("titok", "gpt", build_titok, _titok_inputs, _next_token_sampler,
                    "next_token", _check_titok_size),
}  # fmt: skip


def family_of(config) -> Family:
    name = config.get("family", "var")
    if name not in FAMILIES:
        raise ValueError(f"config.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def param_shapes(family: Family, tokenizer, generator) -> dict[str, Any]:
    """{tokenizer key: shapes, generator key: shapes} from `jax.eval_shape` (nothing allocated), plain
    ShapeDtypeStructs (logical-axis boxes stripped)."""
    tok_in, gen_in = family.init_inputs(tokenizer, generator)
    key = jax.random.key(0)
    return nn.unbox({family.tokenizer: jax.eval_shape(tokenizer.init, key, *tok_in)["params"],
                     family.generator: jax.eval_shape(generator.init, key, *gen_in)["params"]})  # fmt: skip


def init_family_params(family: Family, tokenizer, generator, seed: int) -> dict[str, Any]:
    """Seeded random params for both models."""
    tok_in, gen_in = family.init_inputs(tokenizer, generator)
    k_tok, k_gen = jax.random.split(jax.random.key(seed))
    return {family.tokenizer: init_params(tokenizer, k_tok, *tok_in),
            family.generator: init_params(generator, k_gen, *gen_in)}  # fmt: skip


# Tokenizer fields that only change how training updates the codebook (see jaxgen.models.tokenizers.quantizers):
# the inference model is built without them and reads the trained codebook as a param.
TRAINING_ONLY_TOKENIZER_FIELDS = ("ema_decay", "dead_code_threshold")


def config_section(config, name: str, dtype: str | None = None) -> dict:
    """A model section of a run config as a plain dict ({} when the config has none, e.g. no generator in a
    tokenizer-only run), with its compute `dtype` replaced when given."""
    if name not in config:
        return {}
    section = config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])
    if dtype is not None:
        section["dtype"] = dtype
    return section


def build_models(
    config, tokenizer_dtype: str | None = None, generator_dtype: str | None = None, *, training: bool = False
):
    """(family, tokenizer, generator) from a run config; the dtypes override the sections' compute dtypes. Without
    `training`, the tokenizer is built for inference (EMA-codebook fields dropped; see `inference_params` in
    `jaxgen.train.tokenizer_task` for its params)."""
    family = family_of(config)
    tok_section = config_section(config, family.tokenizer, tokenizer_dtype)
    if not training:
        tok_section = {k: v for k, v in tok_section.items() if k not in TRAINING_ONLY_TOKENIZER_FIELDS}
    tokenizer, generator = family.build(tok_section, config_section(config, family.generator, generator_dtype))
    return family, tokenizer, generator
