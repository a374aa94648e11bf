"""`Family`: everything that differs between model families, as data the binaries read.

A family says how its config sections become a (tokenizer, generator) pair, the generator's training objective on
token ids, its sampler, its size / class checks, and its converter and golden-check hooks. The loop
(`jaxgen.train.loop`), the binaries (`jaxgen.main`, `jaxgen.sample`, `jaxgen.convert`, `jaxgen.convert.verify`)
and the benchmarks look a family up by `config.family` in `jaxgen.families.FAMILIES` and never branch on its name.
How images become ids is the tokenizer's part (`jaxgen.models.tokenizers.protocol.Tokenizer`), shared by all.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# (params, batch {"tokens": int32 [B, L], "label": int32 [B]}, ctx) -> (loss, (metrics, model_state)); ctx.frozen
# holds the tokenizer's params, ctx.rng the step's key (see `jaxgen.train.step.LossFn`).
LossFn = Callable[[Any, dict, Any], tuple[Any, tuple[dict, Any]]]


@dataclasses.dataclass(frozen=True)
class ConvertHook:
    """`python -m jaxgen.convert <family> ...`: the official checkpoints -> (params, config) for `save_pretrained`."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the sub-command's flags (--out is added for you)
    run: Callable[[argparse.Namespace], tuple[dict, dict]]  # -> ({tokenizer key: ..., generator key: ...}, config)


def train_everything(name: str) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class GeneratorStage:
    """One generator training stage: its `config.stages` name (also its `train_<name>` section, workdir folder and
    metrics tag), objective, the params it trains and how it starts. Most families have one, "generator"; HMAR
    trains its next-scale branch, then its masked-prediction branch with the rest frozen."""

    name: str
    objective: Callable[[Any, Any], LossFn]  # (tokenizer, generator) -> loss on token ids
    # top-level param name -> whether this stage trains it; the others are frozen through the optimizer
    trainable: Callable[[str], bool] = train_everything
    # (freshly initialised params, the previous stage's exported params) -> this stage's starting params; None: the
    # first stage, from the random init
    start: Callable[[Any, Any], Any] | None = None
    # the `config.sampling` settings this stage's grids and evals use (e.g. without a branch not trained yet)
    sampling: Callable[[dict], dict] = dict


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # config.family
    tokenizer_key: str  # config section and params key of the tokenizer ("vae", "vq", "titok")
    generator_key: str  # ... and of the generator ("var", "gpt")
    # (tokenizer section, generator section or {} in a tokenizer-only run) -> (tokenizer, generator or None); the
    # generator's vocabulary / layout fields default to the tokenizer's and must agree with it
    build: Callable[[Mapping, Mapping], tuple[Any, Any]]
    generator_inputs: Callable[[Any], tuple]  # generator -> example args of `generator.init` (batch 1)
    objective: Callable[[Any, Any], LossFn]  # (tokenizer, generator) -> the generator's loss on token ids
    sampler: Callable[[Any, Any, Mapping], Any]  # (generator, tokenizer, sampling section) -> a sampler
    image_size: Callable[[Any, Any], int]  # (tokenizer, generator) -> the side in px of the images they generate
    # (tokenizer, generator or None, data.image_size) -> ValueError naming the fields when they do not fit
    check: Callable[[Any, Any, int], None]
    convert: ConvertHook | None = None
    # (fixture .npz, its JSON) -> jaxgen's outputs under the fixture's `out/` names (`jaxgen.convert.verify`)
    golden: Callable[[Path, dict], dict[str, np.ndarray]] | None = None
    # the generator's training stages in order; () is one stage "generator" with `objective`
    stages: tuple[GeneratorStage, ...] = ()
    # False: the tokenizer has no params to train or load (pixels); config.stages has no "tokenizer" then
    trains_tokenizer: bool = True
    # (tokenizer, generator) -> fn(params, batch {"tokens", "label"}) -> {metric: [B]}: per-example metrics of the
    # held-out split (`data.eval_split`) after each generator stage, averaged into the report as held_out_<metric>
    held_out: Callable[[Any, Any], Callable[[Any, dict], dict]] | None = None

    def generator_stages(self) -> tuple[GeneratorStage, ...]:
        return self.stages or (GeneratorStage("generator", self.objective),)


def plain_section(section: Any) -> dict[str, Any]:
    """A config section (ConfigDict or mapping) as a plain dict with lists turned into tuples."""
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def config_from_dict(cls, d: Mapping[str, Any], where: str | None = None):
    """`cls(**d)` for a config dataclass, with an error that names unknown fields (a typo in a config file) and the
    config section `where` they sit in."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} (config.{where or '?'}): unknown fields {unknown}; known: {sorted(fields)}")
    return cls(**d)


def derive(section: dict[str, Any], where: str, **from_tokenizer) -> dict[str, Any]:
    """`section` with the fields the tokenizer decides filled in; a value that disagrees is an error naming it."""
    for field, value in from_tokenizer.items():
        if section.setdefault(field, value) != value:
            raise ValueError(
                f"config: {where}.{field}={section[field]} disagrees with the tokenizer ({value}); the generator must "
                f"match its tokenizer: drop the field or set it to {value}"
            )
    return section


def token_count_check(field: str) -> Callable[[Any, Any, int], None]:
    """A `Family.check`: the tokenizer's layout at `data.image_size` must hold exactly the generator's token count,
    the config field `field` ("gpt.block_size", "maskgit.num_tokens"; read off the generator's config)."""
    attribute = field.rsplit(".", 1)[-1]

    def check(tokenizer, generator, image_size: int) -> None:
        layout = tokenizer.token_layout(image_size)
        if generator is None:
            return
        want = getattr(generator.config, attribute)
        if layout.num_tokens != want:
            raise ValueError(
                f"data.image_size={image_size} gives {layout.num_tokens} tokens per image but {field}={want}: set "
                f"data.image_size so that the tokenizer gives {attribute} tokens, or set {field}={layout.num_tokens}"
            )

    return check
