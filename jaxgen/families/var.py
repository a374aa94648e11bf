"""VAR (next-scale prediction) on the multi-scale residual VQVAE; HMAR's Markov trunk is the same family with
`var.attn_mask="scale_block_diagonal"`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.config_util import load_config
from jaxgen.convert.common import ConversionError, load_state_dict
from jaxgen.convert.var import (
    convert_var,
    convert_vqvae,
    infer_var_config,
    infer_vqvae_config,
    patch_nums_from_levels,
    run_var_fixture,
)
from jaxgen.families.base import ConvertHook, Family, config_from_dict, derive, plain_section
from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer
from jaxgen.models.layers import token_cross_entropy
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling


def build_on_vqvae(vae_section, section, where: str, config_cls=NextScaleConfig, model_cls=NextScaleTransformer):
    """The VQVAE and a next-scale transformer (config section `where`); vocab / z_channels / patch_nums come from the
    VQVAE section unless given (and must agree with it)."""
    vae = MultiScaleVQVAE(config_from_dict(MSVQConfig, plain_section(vae_section), "vae"))
    if not section:
        return vae, None
    c = vae.config
    kw = derive(plain_section(section), where, vocab_size=c.vocab_size, z_channels=c.z_channels,
                patch_nums=c.patch_nums)  # fmt: skip
    return vae, model_cls(config_from_dict(config_cls, kw, where))


def build(vae_section, var_section):
    """The VQVAE and the VAR transformer (`build_on_vqvae`)."""
    return build_on_vqvae(vae_section, var_section, "var")


def generator_inputs(var):
    c = var.config
    return jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - c.first_l, c.z_channels))


def objective(vae, var, token_weights: np.ndarray | None = None):
    """Cross-entropy of every scale's ids, teacher-forced with the frozen VQVAE's next-scale inputs: the mean over
    the tokens, or with per-token `token_weights` `[L]` their weighted sum (averaged over the batch)."""
    layout = vae.token_layout(vae.config.image_size)

    def loss_fn(params, batch, ctx):
        tokens, labels = batch["tokens"], batch["label"]
        x = vae.apply({"params": ctx.frozen}, layout.split_scales(tokens), method=MultiScaleVQVAE.teacher_forcing_input)
        logits = var.apply({"params": params}, labels, x, train=True, rngs={"dropout": ctx.rng})
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}
        if token_weights is None:
            return token_cross_entropy(logits, tokens), (metrics, ctx.model_state)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)  # [B, L]
        return jnp.mean(ce @ jnp.asarray(token_weights, jnp.float32)), (metrics, ctx.model_state)

    return loss_fn


def check(vae, var, image_size: int) -> None:
    vae.token_layout(image_size)  # the size must be patch_nums[-1] x the downsampling


def _add_convert_arguments(p) -> None:
    p.add_argument("--vae", required=True, help="VQVAE state_dict (.pth / .npz / .safetensors)")
    p.add_argument("--var", required=True, help="VAR transformer state_dict (.pth / .npz / .safetensors)")
    p.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")


def _convert(args):
    vae_sd, var_sd = load_state_dict(args.vae), load_state_dict(args.var)
    if args.config:
        cfg = load_config(args.config)
        vae, var = build(cfg.vae, cfg.var)
        vae_cfg, var_cfg = vae.config, var.config
    else:
        if "lvl_1L" not in var_sd:
            raise ConversionError("the VAR state_dict has no lvl_1L buffer to read patch_nums from; pass --config")
        patch_nums = patch_nums_from_levels(var_sd["lvl_1L"])
        vae_cfg = infer_vqvae_config({k: v.shape for k, v in vae_sd.items()}, patch_nums)
        var_cfg = infer_var_config({k: v.shape for k, v in var_sd.items()}, patch_nums=patch_nums)
        print(f"read off the checkpoints: VQVAE {vae_cfg}\nVAR {var_cfg}")
    params = {"vae": convert_vqvae(vae_sd, vae_cfg), "var": convert_var(var_sd, var_cfg)}
    return params, {"family": "var", "vae": dataclasses.asdict(vae_cfg), "var": dataclasses.asdict(var_cfg)}


FAMILY = Family(
    name="var",
    tokenizer_key="vae",
    generator_key="var",
    build=build,
    generator_inputs=generator_inputs,
    objective=objective,
    sampler=lambda var, vae, s: NextScaleSampler(var, vae, NextScaleSampling(**s)),
    image_size=lambda vae, var: vae.config.image_size,
    check=check,
    convert=ConvertHook("FoundationVision/VAR: VQVAE + VAR transformer", _add_convert_arguments, _convert),
    golden=run_var_fixture,
)
