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

from jaxgen.models.registry import build_llamagen, build_var, init_params
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling


@dataclasses.dataclass(frozen=True)
class Family:
    tokenizer: str  # config section and checkpoint key of the tokenizer ("vae", "vq")
    generator: str  # ... and of the generator ("var", "gpt")
    build: Callable[[Any, Any], tuple[Any, Any]]  # (tokenizer section, generator section) -> (tokenizer, generator)
    init_inputs: Callable[[Any, Any], tuple[tuple, tuple]]  # -> (tokenizer init args, generator init args)
    sampler: Callable[[Any, Any, dict], Any]  # (generator, tokenizer, sampling section) -> sampler


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


FAMILIES: dict[str, Family] = {
    "var": Family("vae", "var", build_var, _var_inputs,
                  lambda gen, tok, s: NextScaleSampler(gen, tok, NextScaleSampling(**s))),
    "llamagen": Family("vq", "gpt", build_llamagen, _llamagen_inputs,
                       lambda gen, tok, s: NextTokenSampler(gen, tok, NextTokenSampling(**s))),
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


def config_section(config, name: str, dtype: str | None = None) -> dict:
    """A model section of a run config as a plain dict, with its compute `dtype` replaced when given."""
    section = config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])
    if dtype is not None:
        section["dtype"] = dtype
    return section


def build_models(config, tokenizer_dtype: str | None = None, generator_dtype: str | None = None):
    """(family, tokenizer, generator) from a run config; the dtypes override the sections' compute dtypes."""
    family = family_of(config)
    tokenizer, generator = family.build(
        config_section(config, family.tokenizer, tokenizer_dtype),
        config_section(config, family.generator, generator_dtype),
    )
    return family, tokenizer, generator
