"""The one registry of model families (see `jaxgen.families.base.Family`), read by every binary.

Adding a family is one module here with a `FAMILY = Family(...)` and one line in `FAMILIES`
(docs/architecture.md has the recipe).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.families import axial, hmar, llamagen, maskgit, titok, var
from jaxgen.families.base import Family
from jaxgen.models.registry import init_params

FAMILIES: dict[str, Family] = {
    f.name: f for f in (var.FAMILY, llamagen.FAMILY, titok.FAMILY, maskgit.FAMILY, hmar.FAMILY, axial.FAMILY)
}

# Tokenizer fields that only change how training updates the codebook (see jaxgen.models.tokenizers.quantizers):
# the inference model is built without them and reads the trained codebook as a param.
TRAINING_ONLY_TOKENIZER_FIELDS = ("ema_decay", "dead_code_threshold")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"config.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config) -> Family:
    """The family a run config names (`config.family`)."""
    if "family" not in config:
        raise ValueError(f"the config has no `family` field; set it to one of {sorted(FAMILIES)}")
    return get_family(config.family)


def config_section(config, name: str) -> dict:
    """A model section of a run config as a plain dict ({} when the config has none, e.g. no generator in a
    tokenizer-only run); `family_models` replaces compute dtypes."""
    if name not in config:
        return {}
    return config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])


def model_sections(config) -> tuple[Family, dict[str, dict]]:
    """(family, {tokenizer key: section, generator key: section}) of a run config, read once: what the rest of a run
    passes down instead of the whole config. The generator's section is {} in a tokenizer-only config."""
    family = family_of(config)
    if family.tokenizer_key not in config:
        raise ValueError(f"config has no `{family.tokenizer_key}` section, which family {family.name!r} needs")
    return family, {k: config_section(config, k) for k in (family.tokenizer_key, family.generator_key)}


def family_models(
    family: Family,
    sections: dict[str, dict],
    tokenizer_dtype: str | None = None,
    generator_dtype: str | None = None,
    *,
    training: bool = False,
):
    """(tokenizer, generator or None) from `model_sections`; the dtypes override the sections' compute dtypes.
    Without `training`, the tokenizer is built for inference (EMA-codebook fields dropped; see `inference_params` in
    `jaxgen.train.tokenizer_task` for its params)."""
    tok = dict(sections[family.tokenizer_key])
    gen = dict(sections.get(family.generator_key, {}))
    if tokenizer_dtype is not None:
        tok["dtype"] = tokenizer_dtype
    if generator_dtype is not None and gen:
        gen["dtype"] = generator_dtype
    if not training:
        tok = {k: v for k, v in tok.items() if k not in TRAINING_ONLY_TOKENIZER_FIELDS}
    return family.build(tok, gen)


def build_models(
    config, tokenizer_dtype: str | None = None, generator_dtype: str | None = None, *, training: bool = False
):
    """(family, tokenizer, generator or None) from a run config (`model_sections` + `family_models`)."""
    family, sections = model_sections(config)
    return (family, *family_models(family, sections, tokenizer_dtype, generator_dtype, training=training))


def example_image(family: Family, tokenizer, generator) -> jax.Array:
    """A zero image `[1, S, S, 3]` for `tokenizer.init`, at the size the pair generates."""
    size = family.image_size(tokenizer, generator)
    return jnp.zeros((1, size, size, 3))


def param_shapes(family: Family, tokenizer, generator) -> dict[str, Any]:
    """{tokenizer key: shapes, generator key: shapes} from `jax.eval_shape` (nothing allocated), plain
    ShapeDtypeStructs (logical-axis boxes stripped)."""
    key = jax.random.key(0)
    tok = jax.eval_shape(tokenizer.init, key, example_image(family, tokenizer, generator)).get("params", {})
    gen = jax.eval_shape(generator.init, key, *family.generator_inputs(generator))["params"]
    return nn.unbox({family.tokenizer_key: tok, family.generator_key: gen})


def init_family_params(family: Family, tokenizer, generator, seed: int) -> dict[str, Any]:
    """Seeded random params for both models."""
    k_tok, k_gen = jax.random.split(jax.random.key(seed))
    return {
        family.tokenizer_key: init_params(tokenizer, k_tok, example_image(family, tokenizer, generator)),
        family.generator_key: init_params(generator, k_gen, *family.generator_inputs(generator)),
    }
