"""Config checks that run before any data is read or anything compiles (`check_config`). Every error is one line that
names the config field and says what to do."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxgen.families import build_models
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel.rules import rules_from_config
from jaxgen.train.losses.config import TokenizerLossConfig
from jaxgen.train.tokenizer_task import check_lpips_weights

# Tokenizer fields that do not change its params (compute dtype, kernels, how training updates the codebook): not
# compared with a checkpoint's config.json.
_NOT_PARAM_FIELDS = ("dtype", "attn_backend", "ema_decay", "dead_code_threshold")


def check_config(config) -> None:
    """Raise ValueError for a config that cannot work: unknown stages; image size vs the tokenizer's downsampling and
    token grid; the LPIPS weight file; a train section's sizes and cadence (positive, micro-batches that divide the
    batch, a batch that splits over the mesh's batch axes and the processes, checkpoints on logged steps); for a
    generator-only run, a tokenizer checkpoint that is not the tokenizer the config builds; the eval section's
    sizes and cadence; and the sampling section (the family's sampler is built from it)."""
    stages = tuple(config.get("stages", ()))
    from jaxgen.families import family_of

    check_stages(stages, [s.name for s in family_of(config).generator_stages()])
    for stage in stages:
        if f"train_{stage}" not in config:
            raise ValueError(
                f"config.stages has {stage!r} but the config has no train_{stage} section: add one "
                f"(jaxgen.train.sections.train_section) or drop the stage"
            )
    family, tokenizer, generator = build_models(config, training=True)
    if "tokenizer" in stages and not family.trains_tokenizer:
        raise ValueError(
            f"config.stages has 'tokenizer' but family {family.name!r} models pixels: its tokenizer has nothing to "
            f"train; drop 'tokenizer' from config.stages"
        )
    trains_generator = any(s != "tokenizer" for s in stages)
    family.check(tokenizer, generator if trains_generator else None, int(config.data.image_size))
    loss_cfg = TokenizerLossConfig.from_section(config.get("tokenizer_loss"))
    if "tokenizer" in config.stages:
        check_lpips_weights(loss_cfg)
    batch_axes = batch_mesh_axes(config)
    for stage in stages:
        check_train_section(config[f"train_{stage}"], f"train_{stage}", batch_axes, jax.process_count())
    if trains_generator and "tokenizer" not in stages and family.trains_tokenizer:
        check_tokenizer_checkpoint(config)
    if trains_generator and config.get("eval") is not None:
        check_eval_section(config.eval)
    if trains_generator and "sampling" in config:
        for stage in family.generator_stages():
            if stage.name in stages:
                check_sampling_section(family, tokenizer, generator, stage.sampling(plain_dict(config.sampling)))


def plain_dict(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def check_stages(stages: tuple[str, ...], generator_stages: list[str]) -> None:
    """`config.stages`: known names, in training order; a later generator stage starts from the one before it, which
    must then be in the run too."""
    known = ["tokenizer", *generator_stages]
    if not stages or set(stages) - set(known) or list(stages) != sorted(stages, key=known.index):
        raise ValueError(
            f"config.stages={stages}: each must be one of {tuple(known)}, in that order, e.g. {tuple(known[1:])}"
        )
    for earlier, later in itertools.pairwise(generator_stages):
        if later in stages and earlier not in stages:
            raise ValueError(
                f"config.stages={stages}: stage {later!r} starts from stage {earlier!r}'s params; add {earlier!r}"
            )


def check_sampling_section(family, tokenizer, generator, sampling) -> None:
    """Build the family's sampler from `config.sampling` (no compile): an unknown field or a setting the sampler
    refuses (e.g. MaskGIT's schedule name, more decode steps than tokens) fails before training, not at the first
    sample grid after a stage."""
    settings = plain_dict(sampling)
    try:
        family.sampler(generator, tokenizer, settings)
    except TypeError as e:  # an unknown field of the settings dataclass
        raise ValueError(f"config.sampling: {e}") from None
    except ValueError as e:
        raise ValueError(f"config.sampling: {e}") from None


def batch_mesh_axes(config) -> dict[str, int]:
    """{mesh axis: size} of the axes the batch is split over (the 'batch' rule of `parallel.rules` on the mesh of
    `parallel.mesh` over this run's devices)."""
    sizes = dict(
        zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(dict(config.parallel.mesh), jax.device_count()), strict=True)
    )
    axes: Any = ()
    for name, value in rules_from_config(config.parallel.rules):
        if name == "batch":
            axes = value
            break
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return {a: sizes[a] for a in axes}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_train_section(t, where: str, batch_axes: dict[str, int], num_processes: int = 1) -> None:
    """The checks of one `train_<stage>` section (`where` is its name); `batch_axes` as from `batch_mesh_axes`."""
    for field in ("steps", "batch_size", "accum_steps", "log_every", "ckpt_every"):
        if not _positive_int(t[field]):
            raise ValueError(f"{where}.{field}={t[field]!r}: must be a positive integer")
    if not isinstance(t.sample_every, int) or t.sample_every < 0:
        raise ValueError(
            f"{where}.sample_every={t.sample_every!r}: must be an integer >= 0 (0 = a grid at the end only)"
        )
    batch, accum = t.batch_size, t.accum_steps
    if batch % accum:
        raise ValueError(
            f"{where}.batch_size={batch} is not divisible by accum_steps={accum}: set a batch_size that is a multiple "
            f"of accum_steps (each step averages accum_steps equal micro-batches)"
        )
    micro, shards = batch // accum, math.prod(batch_axes.values())
    if micro % shards:
        over = " x ".join(f"{a}={n}" for a, n in batch_axes.items())
        what = f"batch_size={batch}" if accum == 1 else f"batch_size / accum_steps = {batch} / {accum} = {micro}"
        raise ValueError(
            f"{where}.{what} does not split over the mesh's batch axes ({over} = {shards} shards; parallel.mesh and "
            f"the 'batch' rule of parallel.rules): make each micro-batch a multiple of {shards}, e.g. batch_size="
            f"{max(1, round(micro / shards)) * shards * accum}"
        )
    if batch % num_processes:
        raise ValueError(
            f"{where}.batch_size={batch} does not split over the {num_processes} processes (jax.process_count(); each "
            f"loads batch_size / {num_processes} examples): use a multiple of {num_processes}"
        )
    if t.ckpt_every % t.log_every:
        raise ValueError(
            f"{where}.ckpt_every={t.ckpt_every} must be a multiple of log_every={t.log_every} "
            f"(a checkpoint is written only after its loss was checked to be finite)"
        )


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_eval_section(e) -> None:
    """The checks of the `eval` section (`jaxgen.train.sections.digits_eval_section`): sizes and cadence of the
    generator's evals; fields a recipe does not have are off."""
    batches = e.get("sample_batches", 0)
    if not _int_at_least(batches, 0):
        raise ValueError(f"eval.sample_batches={batches!r}: must be an integer >= 0 (0 = no final report of samples)")
    every = e.get("every", 0)
    if not _int_at_least(every, 0):
        raise ValueError(f"eval.every={every!r}: must be an integer >= 0 (steps between digits-FID evals; 0 = off)")
    if every > 0 and not _int_at_least(e.get("fid_samples"), 2):
        raise ValueError(
            f"eval.fid_samples={e.get('fid_samples')!r}: must be an integer >= 2 when eval.every={every} > 0 (a "
            f"covariance needs 2 samples; ~200 give a stable number), or set eval.every=0"
        )
    inception = e.get("inception_fid_images", 0)
    if not _int_at_least(inception, 0) or inception == 1:
        raise ValueError(
            f"eval.inception_fid_images={inception!r}: must be 0 (off) or an integer >= 2 (a covariance needs 2 images)"
        )


# ---- generator-only runs: the tokenizer checkpoint against the config ------------------------------------------


def _plain(x: Any) -> Any:
    """JSON values as the config has them: lists -> tuples (recursively)."""
    if isinstance(x, list | tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def checkpoint_param_shapes(params_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{"key/path/leaf": shape} of an Orbax params checkpoint, read from its metadata (no array is loaded)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(Path(params_dir).absolute())
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def tokenizer_param_shapes(tokenizer, image_size: int) -> dict[str, tuple[int, ...]]:
    """{"path/leaf": shape} of the params `tokenizer.init` makes for `image_size` px images (`jax.eval_shape`:
    nothing is allocated)."""
    image = jnp.zeros((1, image_size, image_size, 3))
    abstract = jax.eval_shape(tokenizer.init, jax.random.key(0), image)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(abstract), sep="/").items()}


def check_tokenizer_checkpoint(config) -> None:
    """A generator-only run reads its tokenizer from `config.tokenizer_checkpoint` (a `save_pretrained` directory:
    a converter's output or a tokenizer stage's export). Before anything compiles: the directory must be one, of the
    config's family, with the tokenizer section the config has (its config.json) and the param shapes the config's
    tokenizer has (the Orbax metadata, against `jax.eval_shape` of its init). Any difference is one ValueError that
    names the first differing field."""
    path = config.get("tokenizer_checkpoint", "")
    if not path:
        raise ValueError(
            "config.tokenizer_checkpoint is empty but config.stages has no 'tokenizer': set it to a tokenizer "
            "(`python -m jaxgen.convert <family> ... --out DIR`, or WORKDIR/tokenizer/export of a tokenizer run), "
            "or add 'tokenizer' to config.stages"
        )
    directory = Path(path).expanduser()
    if (directory / "tokenizer" / "export").is_dir():  # a tokenizer run's workdir: its export
        directory = directory / "tokenizer" / "export"
    where = f"config.tokenizer_checkpoint={path}"
    if not (directory / "params").is_dir() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{where} is not a jaxgen checkpoint (needs params/ and config.json): make one with "
            f"`python -m jaxgen.convert {config.family} ... --out {path}` or train the tokenizer stage"
        )
    family, tokenizer, _ = build_models(config)  # the inference tokenizer: exports hold its params
    key = family.tokenizer_key
    saved = json.loads((directory / "config.json").read_text())
    saved_family = saved.get("family", config.family)
    if saved_family != config.family:
        raise ValueError(
            f"{where} is a {saved_family} checkpoint but config.family={config.family!r}: use configs/"
            f"{saved_family}_*.py, or a {config.family} tokenizer"
        )
    if isinstance(saved.get(key), dict):
        _check_saved_section(_plain(saved[key]), tokenizer, config, key, where)
    got = checkpoint_param_shapes(directory / "params")
    want = {f"{key}/{k}": v for k, v in tokenizer_param_shapes(tokenizer, int(config.data.image_size)).items()}
    if not any(k.startswith(f"{key}/") for k in got):
        tops = sorted({k.split("/")[0] for k in got})
        raise ValueError(f"{where} holds no {key!r} params (it has {tops}): it is not a {config.family} tokenizer")
    got = {k: v for k, v in got.items() if k.startswith(f"{key}/")}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    misshaped = [k for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if missing or unexpected or misshaped:
        if misshaped:
            k = misshaped[0]
            first = f"{k} is {got[k]} in the checkpoint but {want[k]} in the config"
        else:
            first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        more = len(missing) + len(unexpected) + len(misshaped) - 1
        raise ValueError(
            f"{where} does not fit config.{key}: {first}{f' (and {more} more)' if more else ''}; use the {key} "
            f"section the checkpoint was written with (its config.json) or a checkpoint of this tokenizer"
        )


def _check_saved_section(saved: dict, tokenizer, config, key: str, where: str) -> None:
    """The checkpoint's tokenizer section (config.json) against the config's: first differing field -> ValueError."""
    cfg = getattr(tokenizer, "config", None)
    ours = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(config[key])
    ours = _plain(ours)
    diffs = [f for f in saved if f in ours and f not in _NOT_PARAM_FIELDS and saved[f] != ours[f]]
    if diffs:
        f = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(diffs[1:4])})" if len(diffs) > 1 else ""
        raise ValueError(
            f"{where} was written with {key}.{f}={saved[f]!r} but the config has {key}.{f}={ours[f]!r}{more}: set "
            f"--config.{key}.{f}={saved[f]!r} (see its config.json) or use a checkpoint of this tokenizer"
        )
