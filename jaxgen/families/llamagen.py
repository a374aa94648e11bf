"""LlamaGen (next-token prediction with a Llama GPT) on the VQGAN's 2D token grid."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxgen.config_util import load_config
from jaxgen.convert.common import load_state_dict
from jaxgen.convert.llamagen import (
    check_vocab,
    convert_gpt,
    convert_vq,
    infer_gpt_config,
    infer_vq_config,
    run_llamagen_fixture,
)
from jaxgen.families.base import ConvertHook, Family, config_from_dict, derive, plain_section, token_count_check
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.layers import token_cross_entropy
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling


def build(vq_section, gpt_section):
    """LlamaGen's VQ tokenizer and GPT; the GPT's vocabulary is the codebook size unless given (and must equal it)."""
    vq = VQGAN(config_from_dict(VQConfig, plain_section(vq_section), "vq"))
    if not gpt_section:
        return vq, None
    kw = derive(plain_section(gpt_section), "gpt", vocab_size=vq.vocab_size)
    return vq, NextTokenTransformer(config_from_dict(NextTokenConfig, kw, "gpt"))


def generator_inputs(gpt):
    return jnp.zeros((1,), jnp.int32), jnp.zeros((1, gpt.config.block_size - 1), jnp.int32)


def objective(tokenizer, gpt):
    """Cross-entropy of each id given the class token and the ids before it (any tokenizer's `[B, L]` layout)."""
    del tokenizer  # the GPT reads the ids directly

    def loss_fn(params, batch, ctx):
        tokens, labels = batch["tokens"], batch["label"]
        logits = gpt.apply({"params": params}, labels, tokens[:, :-1], train=True, rngs={"dropout": ctx.rng})
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}
        return token_cross_entropy(logits, tokens), (metrics, ctx.model_state)

    return loss_fn


def sampler(gpt, tokenizer, settings):
    return NextTokenSampler(gpt, tokenizer, NextTokenSampling(**settings))


# The tokenizer's layout at `image_size` must hold exactly the GPT's `block_size` ids.
check_token_count = token_count_check("gpt.block_size")


def _add_convert_arguments(p) -> None:
    p.add_argument("--vq", required=True, help="VQ tokenizer checkpoint (.pt / .npz / .safetensors)")
    p.add_argument("--gpt", required=True, help="GPT checkpoint (.pt / .npz / .safetensors)")
    p.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")
    p.add_argument("--block-size", type=int, default=256, help="image tokens without --config (256 = 16x16)")


def _convert(args):
    vq_sd, gpt_sd = load_state_dict(args.vq), load_state_dict(args.gpt)
    if args.config:
        cfg = load_config(args.config)
        vq, gpt = build(cfg.vq, cfg.gpt)
        vq_cfg, gpt_cfg = vq.config, gpt.config
    else:
        vq_cfg = infer_vq_config({k: v.shape for k, v in vq_sd.items()})
        gpt_cfg = infer_gpt_config({k: v.shape for k, v in gpt_sd.items()}, block_size=args.block_size)
        print(f"read off the checkpoints: VQ {vq_cfg}\nGPT {gpt_cfg}")
    check_vocab(gpt_cfg, vq_cfg.codebook_size)
    params = {"vq": convert_vq(vq_sd, vq_cfg), "gpt": convert_gpt(gpt_sd, gpt_cfg)}
    return params, {"family": "llamagen", "vq": dataclasses.asdict(vq_cfg), "gpt": dataclasses.asdict(gpt_cfg)}


FAMILY = Family(
    name="llamagen",
    tokenizer_key="vq",
    generator_key="gpt",
    build=build,
    generator_inputs=generator_inputs,
    objective=objective,
    sampler=sampler,
    image_size=lambda vq, gpt: math.isqrt(gpt.config.block_size) * vq.config.downsample,
    check=check_token_count,
    convert=ConvertHook(
        "FoundationVision/LlamaGen: VQ tokenizer + class-conditional GPT", _add_convert_arguments, _convert
    ),
    golden=run_llamagen_fixture,
)
