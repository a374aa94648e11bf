"""The Axial Transformer on 8-bit pixels: the pixel tokenizer (`jaxgen.models.tokenizers.pixels`, nothing to train)
and `jaxgen.models.generators.axial`; the objective is upstream's, the bits per dim of one random channel per image;
sampling is the fast cached sampler (`jaxgen.sampling.axial`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.families.base import ConvertHook, Family, config_from_dict, derive, plain_section
from jaxgen.models.generators.axial import AxialConfig, AxialTransformer, bits_per_dim
from jaxgen.models.tokenizers.pixels import PixelConfig, PixelTokenizer
from jaxgen.sampling.axial import AxialSampler, AxialSampling


def build(pixels_section, axial_section):
    """The pixel tokenizer and the model; the model's `channels` is the tokenizer's unless given (and must equal it)."""
    pixels = PixelTokenizer(config_from_dict(PixelConfig, plain_section(pixels_section), "pixels"))
    if not axial_section:
        return pixels, None
    kw = derive(plain_section(axial_section), "axial", channels=pixels.config.channels)
    return pixels, AxialTransformer(config_from_dict(AxialConfig, kw, "axial"))


def pixels_of(model: AxialTransformer, tokens_bl: jax.Array) -> jax.Array:
    """Pixel-tokenizer ids `[B, H * W * C]` -> `[B, H, W, C]` at the model's size."""
    c = model.config
    return tokens_bl.reshape(tokens_bl.shape[0], c.height, c.width, c.channels)


def objective(tokenizer, model: AxialTransformer):
    """Upstream's training loss: for each image one channel k drawn uniformly, the mean negative log-likelihood of
    that channel's H * W values given the channels before it, in bits per dim (nats / ln 2)."""
    del tokenizer
    c = model.config

    def loss_fn(params, batch, ctx):
        x = pixels_of(model, batch["tokens"])
        k_channel, k_drop = jax.random.split(ctx.rng)
        channel = jax.random.randint(k_channel, (x.shape[0],), 0, c.channels)
        logits = model.apply({"params": params}, batch["label"], x, channel, train=True, rngs={"dropout": k_drop},
                             method=AxialTransformer.channel_logits)  # fmt: skip
        target = jnp.take_along_axis(x, channel[:, None, None, None], axis=-1)[..., 0]
        _, bpd = bits_per_dim(logits, target)
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == target)}
        return bpd.mean(), (metrics, ctx.model_state)

    return loss_fn


def held_out(tokenizer, model: AxialTransformer):
    """(params, batch) -> {"bits_per_dim": [B]}: every channel of each held-out image, teacher forced."""
    del tokenizer

    def metrics(params, batch):
        x = pixels_of(model, batch["tokens"])
        _, bpd = bits_per_dim(model.apply({"params": params}, batch["label"], x), x)
        return {"bits_per_dim": bpd}

    return metrics


def check(pixels: PixelTokenizer, model: AxialTransformer | None, image_size: int) -> None:
    """The data's square images must be the model's height x width and have its channel count."""
    if model is None:
        return
    c = model.config
    if (c.height, c.width) != (image_size, image_size):
        raise ValueError(
            f"data.image_size={image_size} but the axial model is built for {c.height} x {c.width} images: set "
            f"axial.height and axial.width to {image_size}, or data.image_size to {c.height}"
        )
    if c.channels != pixels.config.channels:
        raise ValueError(f"axial.channels={c.channels} but pixels.channels={pixels.config.channels}: set them equal")


def _add_convert_arguments(parser) -> None:
    from jaxgen.convert.axial import add_convert_arguments

    add_convert_arguments(parser)


def _convert(args):
    from jaxgen.convert.axial import convert_checkpoint

    return convert_checkpoint(args)


def _golden(fixture, meta):
    from jaxgen.convert.axial_fixture import run_axial_fixture

    return run_axial_fixture(fixture, meta)


FAMILY = Family(
    name="axial",
    tokenizer_key="pixels",
    generator_key="axial",
    build=build,
    generator_inputs=lambda model: model.example_inputs(),
    objective=objective,
    sampler=lambda model, pixels, s: AxialSampler(model, pixels, AxialSampling(**s)),
    image_size=lambda pixels, model: model.config.height,
    check=check,
    convert=ConvertHook(
        "google-research/axial: an Axial Transformer TF checkpoint (its EMA variables when present)",
        _add_convert_arguments,
        _convert,
    ),
    golden=_golden,
    trains_tokenizer=False,
    held_out=held_out,
)
