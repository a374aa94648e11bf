"""Config sections -> model modules. Modules get explicit dataclass configs, never the whole run config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.titok import TiTok, TiTokConfig
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig


def _plain(section: Any) -> dict[str, Any]:
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def config_from_dict(cls, d: Mapping[str, Any]):
    """`cls(**d)` for a config dataclass, with an error that names unknown fields (a typo in a config file)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(fields)}")
    return cls(**d)


def build_var(vae_section: Mapping, var_section: Mapping) -> tuple[MultiScaleVQVAE, NextScaleTransformer]:
    """Build the VQVAE and the VAR transformer; the transformer's vocab / z_channels / patch_nums come from the
    VQVAE section unless given, and must agree with it."""
    vae_cfg = config_from_dict(MSVQConfig, _plain(vae_section))
    var_kw = _plain(var_section)
    for field, value in (
        ("vocab_size", vae_cfg.vocab_size),
        ("z_channels", vae_cfg.z_channels),
        ("patch_nums", vae_cfg.patch_nums),
    ):
        if var_kw.setdefault(field, value) != value:
            raise ValueError(
                f"config: var.{field}={var_kw[field]} disagrees with vae.{field}={value}; "
                f"the transformer must match its tokenizer"
            )
    return MultiScaleVQVAE(vae_cfg), NextScaleTransformer(config_from_dict(NextScaleConfig, var_kw))


def init_params(module, key, *args, **kwargs):
    """`module.init(key, *args)["params"]` as plain arrays (logical-axis boxes stripped), jitted. On CPU, compiled
    without backend optimisation: the initialisers run once, and XLA's optimising passes over hundreds of RNG calls
    take longer than the run (7.8 s -> 2.1 s for a tiny encoder on a 2-core CPU). For params born sharded over a
    mesh, see `jaxgen.parallel.init_sharded`."""
    lowered = jax.jit(lambda k, *a: nn.unbox(module.init(k, *a, **kwargs)["params"])).lower(key, *args)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(key, *args)


def build_llamagen(vq_section: Mapping, gpt_section: Mapping):
    """Build LlamaGen's VQ tokenizer and GPT; the GPT's vocab must equal the codebook size."""
    vq_cfg = config_from_dict(VQConfig, _plain(vq_section))
    gpt_kw = _plain(gpt_section)
    if gpt_kw.setdefault("vocab_size", vq_cfg.codebook_size) != vq_cfg.codebook_size:
        raise ValueError(
            f"config: gpt.vocab_size={gpt_kw['vocab_size']} but the tokenizer has "
            f"{vq_cfg.codebook_size} codes; set gpt.vocab_size={vq_cfg.codebook_size} or use the "
            f"matching tokenizer"
        )
    return VQGAN(vq_cfg), NextTokenTransformer(config_from_dict(NextTokenConfig, gpt_kw))


def build_titok(titok_section: Mapping, gpt_section: Mapping):
    """Build the 1D TiTok tokenizer and a GPT over its K tokens: the GPT's vocab is the codebook size, its
    block_size is K, and its RoPE is 1D (the K tokens have no 2D grid) unless the section says otherwise."""
    titok_cfg = config_from_dict(TiTokConfig, _plain(titok_section))
    gpt_kw = _plain(gpt_section)
    for field, value in (("vocab_size", titok_cfg.codebook_size), ("block_size", titok_cfg.num_tokens)):
        if gpt_kw.setdefault(field, value) != value:
            raise ValueError(
                f"config: gpt.{field}={gpt_kw[field]} disagrees with the tokenizer ({value}: codebook_size / "
                f"num_latent_tokens); the GPT must match its tokenizer"
            )
    gpt_kw.setdefault("rope_2d", False)
    return TiTok(titok_cfg), NextTokenTransformer(config_from_dict(NextTokenConfig, gpt_kw))
