"""`train_and_evaluate(config, workdir)`: a run's stages, end to end.

    stage "tokenizer":  images -> train the tokenizer (reconstruction + codebook + commitment losses)
    pretokenize:        the train split -> token-id shards (workdir/tokens), once
    stage "generator":  token ids -> train the generator (next scale / next token), sample grids on the way
    evaluate:           class-conditional samples -> a held-out digit classifier's agreement (report.json)

Every stage runs the same `train_stage` (one loop for every model): a jitted, sharded `train_step`, a progress line,
metrics.jsonl + TensorBoard, Orbax checkpoints that resume exactly, and a clean stop when the loss is not finite.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen import data as data_lib
from jaxgen.eval.grids import save_grid
from jaxgen.families import Family, family_models, model_sections
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.parallel.rules import rules_from_config
from jaxgen.pretrained import load_pretrained, save_pretrained
from jaxgen.train import checkpoint as ckpt_lib
from jaxgen.train import preemption
from jaxgen.train.checks import check_config
from jaxgen.train.errors import TrainingError
from jaxgen.train.generator_task import encode_fn, generator_task
from jaxgen.train.optim import learning_rate_schedule
from jaxgen.train.reporting import MetricsWriter, Progress, parameter_overview
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step
from jaxgen.train.task import Task
from jaxgen.train.tokenizer_task import (
    TokenizerLossConfig,
    evaluate_tokenizer,
    load_lpips_frozen,
    lpips_path,
    reconstruct_fn,
    tokenizer_task,
)


def _fingerprint(config, family: Family, sections: dict, stage: str) -> dict:
    """The config fields that define a stage's model and its data: a checkpoint of another model must not resume."""
    fp = {"family": family.name, family.tokenizer_key: sections[family.tokenizer_key]}
    if stage == "tokenizer":
        loss = TokenizerLossConfig.from_section(config.get("tokenizer_loss"))
        if loss.use_gan:  # the discriminator's shape is part of the checkpoint
            fp["discriminator"] = {"ndf": loss.disc_ndf, "layers": loss.disc_layers, "norm": loss.disc_norm}
    if stage == "generator":
        fp[family.generator_key] = sections[family.generator_key]
    fp["image_size"] = int(config.data.image_size)
    return json.loads(json.dumps(fp, default=list))


def _claim_stage_dir(stage_dir: Path, fingerprint: dict) -> None:
    """Write stage_dir/model.json on first use; later runs must match it, else nothing is touched."""
    path = stage_dir / "model.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("family") != fingerprint.get("family"):
            raise ValueError(
                f"{stage_dir} holds a {old.get('family')} checkpoint but the config is family "
                f"{fingerprint.get('family')!r}; nothing was overwritten: use configs/{old.get('family')}_*.py (see "
                f"{path}) or a new --workdir"
            )
        if old != fingerprint:
            diffs = []
            for key in sorted(set(old) | set(fingerprint)):
                a, b = old.get(key), fingerprint.get(key)
                if isinstance(a, dict) and isinstance(b, dict):
                    diffs += [
                        f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                        for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)
                    ]
                elif a != b:
                    diffs.append(f"{key}: {a!r} -> {b!r}")
            raise ValueError(
                f"{stage_dir} holds a checkpoint of a different model ({'; '.join(diffs[:6])}). Nothing was "
                f"overwritten. Use a new --workdir, or the config that wrote it (see {path})."
            )
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=1))


# ---- one stage ---------------------------------------------------------------------------------------------------


def train_stage(
    task: Task,
    tc: Any,
    data_cfg: Any,
    stage_dir: Path,
    *,
    mesh,
    rules,
    seed: int,
    writer: MetricsWriter,
    sample_fn: Callable[[Any, int], None] | None = None,
) -> Any:
    """Train `task` for `tc.steps` steps (resuming from stage_dir/checkpoints if present); returns the final
    state (params, EMA params, ...). `sample_fn(task.export(state), step)` writes grids on the way."""
    data_iter = data_lib.make_train_iterator(data_cfg, global_batch_size=int(tc.batch_size), seed=seed)
    tx = task.optimizer(tc)
    schedule = learning_rate_schedule(tc)

    def init_state(key_data):
        key = jax.random.wrap_key_data(key_data)
        params, model_state = task.init(key)
        return create_state(params, tx, jax.random.key_data(jax.random.fold_in(key, 1)), model_state)

    key_data = jax.random.key_data(jax.random.key(seed))
    abstract = partition.abstract_boxed(init_state, key_data)
    shardings = partition.tree_shardings(abstract, mesh, rules)
    mngr = ckpt_lib.make_manager(stage_dir / "checkpoints", keep=int(tc.keep_checkpoints), best_metric="loss")
    if mngr.latest_step() is not None:
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            partition.strip_boxes(abstract),
            shardings,
        )
        state = ckpt_lib.restore_train_state(mngr, target, data_iter)
        logging.info("[%s] resumed from step %d (%s)", task.name, int(state.step), stage_dir / "checkpoints")
    else:
        state = partition.init_sharded(init_state, mesh, rules, key_data)
    logging.info("[%s] parameters:\n%s", task.name, parameter_overview(state.params, shardings.params))

    start = int(jax.device_get(state.step))
    if start >= tc.steps:
        logging.info("[%s] already trained (%d/%d steps)", task.name, start, tc.steps)
        mngr.close()
        return state
    step_fn = make_train_step(
        task.loss_fn, tx, ema_decay=float(tc.ema_decay), accum_steps=int(tc.accum_steps), schedule=schedule
    )
    replicated = NamedSharding(mesh, P())
    frozen = jax.device_put(task.frozen, replicated) if task.frozen is not None else None
    batch_ndim = {"image": 4, "tokens": 2, "label": 1}
    batch_shardings = {k: partition.batch_sharding(mesh, rules, batch_ndim[k]) for k in (task.batch_key, "label")}
    frozen_shardings = jax.tree.map(lambda _: replicated, frozen)

    with partition.activation_rules(mesh, rules), preemption.stop_on_signals() as stop:
        step_fn = jax.jit(
            step_fn,
            in_shardings=(shardings, batch_shardings, frozen_shardings),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        progress = Progress(task.name, start, int(tc.steps))
        pending: list[dict] = []
        last_good = mngr.latest_step()
        for step in range(start + 1, int(tc.steps) + 1):
            batch = next(data_iter)
            batch = partition.shard_batch({k: batch[k] for k in batch_shardings}, mesh, rules)
            state, metrics = step_fn(state, batch, frozen)
            pending.append(metrics)
            # SIGTERM / SIGINT: check the loss, save (state + data position), wait for the write, raise Preempted.
            stopping = stop.requested()
            if stopping or step % tc.log_every == 0 or step == tc.steps:
                host = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
                pending = []
                skipped = data_lib.skipped_count()
                if skipped:
                    host["skipped_images"] = float(skipped)
                writer.write(step, host, stage=task.name)
                progress.update(step, host)
                if not math.isfinite(host["loss"]):
                    progress.close()
                    mngr.close()
                    kept = (
                        f"The last good checkpoint (step {last_good}) is kept in {stage_dir / 'checkpoints'}"
                        if last_good is not None
                        else "No checkpoint had been written yet"
                    )
                    raise TrainingError(
                        f"[{task.name}] the loss became {host['loss']} by step {step}; stopped without saving. "
                        f"{kept}. Lower train_{task.name}.lr, raise warmup_steps or set grad_clip, then rerun "
                        f"(it resumes from the last checkpoint)."
                    )
                if stopping or step % tc.ckpt_every == 0 or step == tc.steps:
                    ckpt_lib.save_train_state(mngr, state, data_iter, metrics={"loss": host["loss"]})
                    last_good = step
            if stopping:
                progress.close()
                mngr.close()  # waits until the checkpoint is complete
                raise preemption.Preempted(task.name, step, int(tc.steps), stop.signum, mngr.directory / str(step))
            if sample_fn is not None and ((tc.sample_every and step % tc.sample_every == 0) or step == tc.steps):
                sample_fn(task.export(state), step)
        progress.close()
    mngr.close()
    return state


# ---- the run -----------------------------------------------------------------------------------------------------


def _class_grid_labels(config, num_classes: int) -> np.ndarray:
    """`config.grid.classes` repeated `per_class` times; a class the generator does not have is an error."""
    classes = [int(c) for c in config.grid.classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"grid.classes {bad} are outside the generator's {num_classes} classes (0..{num_classes - 1}): fix "
            f"grid.classes or the generator's num_classes"
        )
    return np.repeat(np.asarray(classes, np.int32), int(config.grid.per_class))


def _check_classes(config, generator) -> None:
    """The dataset's classes (train and eval split) must fit the generator's `num_classes`, before anything runs."""
    for split in (config.data.train_split, config.data.eval_split):
        data_lib.check_class_count(data_lib.load_source(config.data, split), generator.config.num_classes)


def _tokenizer_sample_fn(tokenizer, config, stage_dir: Path) -> Callable[[Any, int], None]:
    """Grids of originals next to their reconstructions (pairs, 4 pairs per row) from the eval split."""
    images = data_lib.load_eval_arrays(config.data, config.data.eval_split, max_examples=32)["image"]
    recon = reconstruct_fn(tokenizer)

    def sample(params, step):
        rec = np.asarray(jax.device_get(recon(params, images)))
        pairs = np.stack([images, rec], axis=1).reshape(-1, *images.shape[1:])
        save_grid(
            (pairs + 1) / 2,
            stage_dir / "samples" / f"recon_{step:06d}.png",
            nrow=8,
            scale=max(1, 64 // images.shape[1]),
        )

    return sample


def _generate(sampler, gen_params, tok_params, labels, key) -> np.ndarray:
    """Class-conditional samples `[B, H, W, 3]` in [0, 1] (the samplers' output range)."""
    out = sampler(gen_params, tok_params, labels, key)
    return np.asarray(jax.device_get(out.images))


def to_host(tree: Any) -> Any:
    """A (possibly sharded over several hosts) pytree as numpy arrays on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _export(stage_dir: Path, params: dict, family: Family, sections: dict) -> None:
    """`stage_dir/export`: the stage's params (EMA) as a `jaxgen.pretrained` checkpoint, from every process; its
    config.json holds the family and the sections of the models in `params`."""
    meta = {"family": family.name, **{k: sections[k] for k in params}}
    save_pretrained(stage_dir / "export", params, meta)
    logging.info("exported %s to %s", "+".join(params), stage_dir / "export")


def _load_tokenizer(config, family: Family) -> Any:
    """The tokenizer params of `config.tokenizer_checkpoint` (a converted checkpoint, a tokenizer export or a run's
    workdir) as host arrays; `check_config` has checked the family, the section and every shape already."""
    path = Path(config.tokenizer_checkpoint).expanduser()
    if (path / "tokenizer" / "export").is_dir():
        path = path / "tokenizer" / "export"
    _, loaded = load_pretrained(path, family=family.name)
    return jax.device_get(loaded[family.tokenizer_key])


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Run the config's stages under `workdir`; returns (and writes to workdir/report.json) the final report."""
    t_start = time.perf_counter()
    workdir = Path(workdir)
    mesh_lib.initialize_distributed()
    check_config(config)
    family, sections = model_sections(config)
    inference_tok, generator = family_models(family, sections)
    data_lib.load_source(config.data, config.data.train_split)  # missing/empty/unreadable data: fail before compiling
    if "generator" in config.stages:
        _check_classes(config, generator)
        grid_labels = _class_grid_labels(config, generator.config.num_classes)
        tok_params = None if "tokenizer" in config.stages else _load_tokenizer(config, family)
    fingerprints = {s: _fingerprint(config, family, sections, s) for s in config.stages}
    for stage in config.stages:
        _claim_stage_dir(workdir / stage, fingerprints[stage])
    mesh = mesh_lib.create_mesh(dict(config.parallel.mesh))
    rules = rules_from_config(config.parallel.rules)
    writer = MetricsWriter(workdir)
    report: dict[str, Any] = {"family": family.name, "workdir": str(workdir.absolute())}

    # -- tokenizer
    if "tokenizer" in config.stages:
        t = config.train_tokenizer
        tokenizer, _ = family_models(family, sections, tokenizer_dtype=t.compute_dtype, training=True)
        loss_cfg = TokenizerLossConfig.from_section(config.get("tokenizer_loss"))
        task = tokenizer_task(
            tokenizer, loss_cfg, image_size=int(config.data.image_size), frozen=load_lpips_frozen(loss_cfg)
        )
        state = train_stage(
            task,
            t,
            config.data,
            workdir / "tokenizer",
            mesh=mesh,
            rules=rules,
            seed=int(config.seed),
            writer=writer,
            sample_fn=_tokenizer_sample_fn(inference_tok, config, workdir / "tokenizer"),
        )
        exported = task.export(state)
        _export(workdir / "tokenizer", {family.tokenizer_key: exported}, family, sections)
        tok_params = to_host(exported)
        report["tokenizer"] = _tokenizer_eval(inference_tok, tok_params, config, loss_cfg)
        writer.write(int(state.step), {k: v for k, v in report["tokenizer"].items() if v is not None},
                     stage="tokenizer_eval")  # fmt: skip

    if "generator" not in config.stages:
        return _finish(report, workdir, writer, t_start)

    # -- pretokenize (again whenever the data or the tokenizer changed), then the generator
    tokens_dir = workdir / "tokens"
    tokenizer_id = {
        "family": family.name,
        family.tokenizer_key: sections[family.tokenizer_key],
        "params_sha256": data_lib.params_fingerprint(tok_params),
    }
    written, why = data_lib.ensure_token_shards(
        encode_fn(inference_tok, tok_params), config.data, tokens_dir, split=config.data.train_split,
        tokenizer=tokenizer_id,
    )  # fmt: skip
    logging.info("%s token shards in %s: %s", "wrote" if written else "reusing", tokens_dir, why)
    token_data = data_lib.with_source(config.data, kind="tokens", path=str(tokens_dir))
    g = config.train_generator
    plain_tok, generator = family_models(family, sections, generator_dtype=g.compute_dtype)
    sampler = family.sampler(generator, plain_tok, config.sampling.to_dict())

    def sample_grid(params, step):
        images = _generate(sampler, params, tok_params, grid_labels, jax.random.key(int(config.seed) + step))
        save_grid(
            images,
            workdir / "generator" / "samples" / f"samples_{step:06d}.png",
            nrow=int(config.grid.per_class),
            row_labels=[f"class {c}" for c in np.unique(grid_labels)],
            scale=max(1, 64 // images.shape[1]),
        )

    task = generator_task(family, plain_tok, generator, tok_params)
    state = train_stage(
        task,
        g,
        token_data,
        workdir / "generator",
        mesh=mesh,
        rules=rules,
        seed=int(config.seed) + 1,
        writer=writer,
        sample_fn=sample_grid,
    )
    gen_params = task.export(state)
    _export(
        workdir / "generator", {family.tokenizer_key: tok_params, family.generator_key: gen_params}, family, sections
    )
    if int(config.eval.get("sample_batches", 0)) > 0:
        report["generator"] = _generator_eval(config, sampler, gen_params, tok_params, grid_labels, workdir)
    return _finish(report, workdir, writer, t_start)


def _tokenizer_eval(tokenizer, params, config, loss_cfg: TokenizerLossConfig) -> dict:
    """Reconstruction PSNR (dB), SSIM, LPIPS (when its weight file exists) and codebook usage over the eval split."""
    from jaxgen.models.lpips import load_lpips_params

    arrays = data_lib.load_eval_arrays(config.data, config.data.eval_split)
    path = lpips_path(loss_cfg)
    lpips_params = load_lpips_params(path) if path.is_file() else None
    result = evaluate_tokenizer(tokenizer, params, arrays["image"], lpips_params=lpips_params)
    if lpips_params is None:
        result["lpips"] = None
        logging.info("LPIPS not reported: no weight file at %s (see docs/lpips.md)", path)
    return result


def _generator_eval(config, sampler, gen_params, tok_params, grid_labels, workdir: Path) -> dict:
    """Class fidelity: samples for every class, scored by a classifier fit on the real held-out split."""
    from jaxgen.eval.class_fidelity import fit_classifier

    held_out = data_lib.load_eval_arrays(config.data, config.data.eval_split)
    train = data_lib.load_eval_arrays(config.data, config.data.train_split)
    classifier = fit_classifier(held_out["image"], held_out["label"], seed=int(config.seed))
    images, labels = [], []
    for i in range(int(config.eval.sample_batches)):
        images.append(_generate(sampler, gen_params, tok_params, grid_labels, jax.random.key(10_000 + i)))
        labels.append(grid_labels)
    images, labels = np.concatenate(images), np.concatenate(labels)
    result = classifier.score(images * 2.0 - 1.0, labels)  # the classifier reads [-1, 1], as the data pipeline
    result["classifier_accuracy_real"] = float(classifier.real_accuracy(train["image"], train["label"]))
    n = int(config.grid.per_class)
    save_grid(
        images[: len(grid_labels)],
        workdir / "final_samples.png",
        nrow=n,
        row_labels=[f"class {c}" for c in np.unique(grid_labels)],
        scale=max(1, 64 // images.shape[1]),
    )
    return result


def _finish(report: dict, workdir: Path, writer: MetricsWriter, t_start: float) -> dict:
    writer.close()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["device"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    if jax.process_index() == 0:
        (workdir / "report.json").write_text(json.dumps(report, indent=1))
    return report
