"""`train_and_evaluate(config, workdir)`: a run's stages, end to end.

    stage "tokenizer":  images -> train the tokenizer (reconstruction + codebook + commitment losses)
    pretokenize:        the train split -> token-id shards (workdir/tokens), once
    stage "generator":  token ids -> train the generator (next scale / next token), sample grids on the way, and
                        every `eval.every` steps the digits FID of class-balanced samples (metrics.jsonl, TensorBoard)
    later stages:       a family's further generator stages (`Family.stages`, e.g. HMAR's "mask"), each from the
                        previous one's params, training the params it names with the rest frozen
    evaluate:           class-conditional samples -> a held-out digit classifier's agreement and the digits FID
                        beside its real-data floor (report.json); the Inception FID too when its weights are installed

Every stage runs the same `train_stage` (one loop for every model): a jitted, sharded `train_step`, a progress line,
metrics.jsonl + TensorBoard, Orbax checkpoints that resume exactly, and a clean stop when the loss is not finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
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
from jaxgen.parallel import distributed, partition
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel.rules import rules_from_config
from jaxgen.paths import as_path, host_cache_dir, is_url
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
    if stage != "tokenizer":
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
    if jax.process_index() == 0:  # the others see it after the barrier in `train_and_evaluate`
        stage_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=1))


# ---- one stage ---------------------------------------------------------------------------------------------------


_BATCH_NDIM = {"image": 4, "tokens": 2, "label": 1}


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage's train step and the shardings of what it reads, built without data or devices' memory: what
    `train_stage` runs and what `jaxgen.aot` lowers for a TPU topology. Everything is on `mesh`."""

    init_state: Callable[[Any], Any]  # key data -> the initial TrainState (jit it with `partition.init_sharded`)
    key_data: Any  # the stage's PRNG key data (uint32 [2])
    abstract_state: Any  # the TrainState as ShapeDtypeStructs with their shardings
    state_shardings: Any  # NamedSharding per TrainState leaf
    batch_shardings: dict  # {task.batch_key: ..., "label": ...}: batch-sharded, rest replicated
    frozen_shardings: Any  # the frozen params' shardings (replicated); None when the task has none
    step: Callable  # the pure (state, batch, frozen) -> (state, metrics)

    def jit_step(self):
        """The jitted step: the state sharded as `abstract_state` (donated), the batch over the batch axes."""
        return jax.jit(
            self.step,
            in_shardings=(self.state_shardings, self.batch_shardings, self.frozen_shardings),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )


def plan_stage(task: Task, tc: Any, *, mesh, rules, seed: int) -> StagePlan:
    """`task`'s train step under the train section `tc` (optimizer, schedule, EMA, accumulation) on `mesh`."""
    tx = task.optimizer(tc)

    def init_state(key_data):
        key = jax.random.wrap_key_data(key_data)
        params, model_state = task.init(key)
        return create_state(params, tx, jax.random.key_data(jax.random.fold_in(key, 1)), model_state)

    key_data = jax.random.key_data(jax.random.key(seed))
    boxed = partition.abstract_boxed(init_state, key_data)
    shardings = partition.tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), partition.strip_boxes(boxed), shardings
    )
    replicated = NamedSharding(mesh, P())
    step = make_train_step(
        task.loss_fn,
        tx,
        ema_decay=float(tc.ema_decay),
        accum_steps=int(tc.accum_steps),
        schedule=learning_rate_schedule(tc),
    )
    return StagePlan(
        init_state=init_state,
        key_data=key_data,
        abstract_state=abstract,
        state_shardings=shardings,
        batch_shardings={k: partition.batch_sharding(mesh, rules, _BATCH_NDIM[k]) for k in (task.batch_key, "label")},
        frozen_shardings=jax.tree.map(lambda _: replicated, task.frozen),
        step=step,
    )


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
    callbacks: Sequence[tuple[int, Callable[[Any, int], None]]] = (),
) -> Any:
    """Train `task` for `tc.steps` steps (resuming from stage_dir/checkpoints if present); returns the final
    state (params, EMA params, ...). Each `(every, fn)` of `callbacks` runs `fn(task.export(state), step)` at the
    steps that are multiples of `every` (0: none) and at the last step, on every process (grids, evals)."""
    data_iter = data_lib.make_train_iterator(data_cfg, global_batch_size=int(tc.batch_size), seed=seed)
    plan = plan_stage(task, tc, mesh=mesh, rules=rules, seed=seed)
    mngr = ckpt_lib.make_manager(stage_dir / "checkpoints", keep=int(tc.keep_checkpoints), best_metric="loss")
    if mngr.latest_step() is not None:
        state = ckpt_lib.restore_train_state(mngr, plan.abstract_state, data_iter)
        logging.info("[%s] resumed from step %d (%s)", task.name, int(state.step), stage_dir / "checkpoints")
    else:
        state = partition.init_sharded(plan.init_state, mesh, rules, plan.key_data)
    logging.info("[%s] parameters:\n%s", task.name, parameter_overview(state.params, plan.state_shardings.params))

    start = int(jax.device_get(state.step))
    if start >= tc.steps:
        logging.info("[%s] already trained (%d/%d steps)", task.name, start, tc.steps)
        mngr.close()
        return state
    frozen = jax.device_put(task.frozen, plan.frozen_shardings) if task.frozen is not None else None
    batch_shardings = plan.batch_shardings

    with partition.activation_rules(mesh, rules), preemption.stop_on_signals() as stop:
        step_fn = plan.jit_step()
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
            due = [fn for every, fn in callbacks if (every and step % every == 0) or step == tc.steps]
            if due:
                exported = _callback_params(task.export(state))
                with _on_local_devices(mesh, rules):
                    for fn in due:
                        fn(exported, step)
        progress.close()
    mngr.close()
    return state


# ---- the run -----------------------------------------------------------------------------------------------------


def _save_grid(*args, **kwargs) -> None:
    """`save_grid` on process 0 only (every process computes the same images)."""
    if jax.process_index() == 0:
        save_grid(*args, **kwargs)


def _callback_params(params: Any) -> Any:
    """The params grids and evals read: as they are on one process; with several, gathered to host arrays, so
    each process samples on its own devices (`_on_local_devices`), all of them alike."""
    return to_host(params) if jax.process_count() > 1 else params


@contextlib.contextmanager
def _on_local_devices(mesh, rules):
    """With several processes: the grids and evals run under a mesh of this process's devices (no collective
    with the other hosts; every process gets the same numbers, process 0 writes them). One process: `mesh`."""
    if jax.process_count() == 1:
        yield
        return
    with partition.activation_rules(mesh_lib.create_mesh({"data": -1}, jax.local_devices()), rules):
        yield


def _class_grid_labels(config, num_classes: int) -> np.ndarray:
    """`config.grid.classes` repeated `per_class` times; a class the generator does not have is an error."""
    classes = [int(c) for c in config.grid.classes]
    bad = [c for c in classes if not 0 <= c < num_classes] if num_classes else []  # 0: unconditional
    if bad:
        raise ValueError(
            f"grid.classes {bad} are outside the generator's {num_classes} classes (0..{num_classes - 1}): fix "
            f"grid.classes or the generator's num_classes"
        )
    return np.repeat(np.asarray(classes, np.int32), int(config.grid.per_class))


def _check_classes(config, generator) -> None:
    """The dataset's classes (train and eval split) must fit the generator's `num_classes`, before anything runs
    (an unconditional generator, num_classes 0, takes any)."""
    for split in (config.data.train_split, config.data.eval_split):
        data_lib.check_class_count(data_lib.load_source(config.data, split), generator.config.num_classes or None)


def _tokenizer_sample_fn(tokenizer, config, stage_dir: Path) -> Callable[[Any, int], None]:
    """Grids of originals next to their reconstructions (pairs, 4 pairs per row) from the eval split."""
    images = data_lib.load_eval_arrays(config.data, config.data.eval_split, max_examples=32)["image"]
    recon = reconstruct_fn(tokenizer)

    def sample(params, step):
        rec = np.asarray(jax.device_get(recon(params, images)))
        pairs = np.stack([images, rec], axis=1).reshape(-1, *images.shape[1:])
        _save_grid(
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
    path = as_path(config.tokenizer_checkpoint)
    if (path / "tokenizer" / "export").is_dir():
        path = path / "tokenizer" / "export"
    _, loaded = load_pretrained(path, family=family.name)
    return jax.device_get(loaded[family.tokenizer_key])


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Run the config's stages under `workdir`; returns (and writes to workdir/report.json) the final report."""
    t_start = time.perf_counter()
    workdir = as_path(workdir)  # local, or a bucket (gs://...) that Orbax and epath write to
    distributed.initialize_distributed()  # a no-op when the binary has started it (or on one process)
    distributed.check_same_run({"config": config.to_json(), "workdir": os.fspath(workdir)})
    check_config(config)
    family, sections = model_sections(config)
    inference_tok, generator = family_models(family, sections)
    data_lib.load_source(config.data, config.data.train_split)  # missing/empty/unreadable data: fail before compiling
    if any(s.name in config.stages for s in family.generator_stages()):
        _check_classes(config, generator)
        grid_labels = _class_grid_labels(config, generator.config.num_classes)
        if not family.trains_tokenizer:
            tok_params = {}  # nothing to train or load (pixels)
        else:
            tok_params = None if "tokenizer" in config.stages else _load_tokenizer(config, family)
    fingerprints = {s: _fingerprint(config, family, sections, s) for s in config.stages}
    for stage in config.stages:
        _claim_stage_dir(workdir / stage, fingerprints[stage])
    distributed.barrier("jaxgen: the stage directories are claimed")
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
            callbacks=[(int(t.sample_every), _tokenizer_sample_fn(inference_tok, config, workdir / "tokenizer"))],
        )
        exported = task.export(state)
        _export(workdir / "tokenizer", {family.tokenizer_key: exported}, family, sections)
        tok_params = to_host(exported)
        report["tokenizer"] = _tokenizer_eval(inference_tok, tok_params, config, loss_cfg)
        writer.write(int(state.step), {k: v for k, v in report["tokenizer"].items() if v is not None},
                     stage="tokenizer_eval")  # fmt: skip

    stages = [s for s in family.generator_stages() if s.name in config.stages]
    if not stages:
        return _finish(report, workdir, writer, t_start)

    # -- pretokenize (again whenever the data or the tokenizer changed), then the generator's stages
    # Token shards are memory-mapped, so a bucket workdir's live on each host's disk, each host writing its own.
    per_host = is_url(workdir)
    tokens_dir = host_cache_dir("tokens", os.fspath(workdir)) if per_host else workdir / "tokens"
    tokenizer_id = {
        "family": family.name,
        family.tokenizer_key: sections[family.tokenizer_key],
        "params_sha256": data_lib.params_fingerprint(tok_params),
    }
    written, why = data_lib.ensure_token_shards(
        encode_fn(inference_tok, tok_params), config.data, tokens_dir, split=config.data.train_split,
        tokenizer=tokenizer_id, per_host=per_host,
    )  # fmt: skip
    logging.info("%s token shards in %s: %s", "wrote" if written else "reusing", tokens_dir, why)
    token_data = data_lib.with_source(config.data, kind="tokens", path=str(tokens_dir))
    eval_every, scored = int(config.eval.get("every", 0)), int(config.eval.get("sample_batches", 0)) > 0
    real = _real_digits(config) if eval_every > 0 or scored else None
    gen_params = None
    for i, stage in enumerate(stages):
        g = config[f"train_{stage.name}"]
        stage_dir = workdir / stage.name
        plain_tok, generator = family_models(family, sections, generator_dtype=g.compute_dtype)
        sampler = family.sampler(generator, plain_tok, stage.sampling(config.sampling.to_dict()))

        def sample_grid(params, step, sampler=sampler, stage_dir=stage_dir):
            images = _generate(sampler, params, tok_params, grid_labels, jax.random.key(int(config.seed) + step))
            _save_grid(
                images,
                stage_dir / "samples" / f"samples_{step:06d}.png",
                nrow=int(config.grid.per_class),
                row_labels=[f"class {c}" for c in np.unique(grid_labels)],
                scale=max(1, 64 // images.shape[1]),
            )

        callbacks = [(int(g.sample_every), sample_grid)]
        if eval_every > 0:
            fid_fn = _digits_fid_callback(config, sampler, tok_params, len(grid_labels), real, writer, stage.name)
            callbacks.append((eval_every, fid_fn))
        task = generator_task(family, plain_tok, generator, tok_params, stage, gen_params)
        state = train_stage(
            task,
            g,
            token_data,
            stage_dir,
            mesh=mesh,
            rules=rules,
            seed=int(config.seed) + 1 + i,
            writer=writer,
            callbacks=callbacks,
        )
        gen_params = task.export(state)
        _export(stage_dir, {family.tokenizer_key: tok_params, family.generator_key: gen_params}, family, sections)
        if family.held_out is not None:
            held = _held_out_eval(family, plain_tok, tok_params, generator, gen_params, config)
            writer.write(int(state.step), held, stage=f"{stage.name}_eval")
            report.setdefault(stage.name, {}).update(held)
        if scored:
            last = i == len(stages) - 1
            report.setdefault(stage.name, {}).update(_generator_eval(
                config, sampler, _callback_params(gen_params), tok_params, grid_labels, workdir, real,
                stage_dir if not last else workdir,
            ))  # fmt: skip
        if i < len(stages) - 1:  # the next stage starts from these
            gen_params = to_host(gen_params)
    return _finish(report, workdir, writer, t_start)


def _held_out_eval(family: Family, tokenizer, tok_params, generator, gen_params, config, batch_size: int = 64) -> dict:
    """`family.held_out`'s per-example metrics over the whole held-out split (`data.eval_split`), averaged:
    {"held_out_<metric>": mean, "held_out_images": n}. The images become ids with the tokenizer (in batches)."""
    t0 = time.perf_counter()
    arrays = data_lib.load_eval_arrays(config.data, config.data.eval_split)
    encode = encode_fn(tokenizer, tok_params)
    metric_fn = jax.jit(family.held_out(tokenizer, generator))
    params = to_host(gen_params)
    sums: dict[str, float] = {}
    n = len(arrays["image"])
    for begin in range(0, n, batch_size):
        images = arrays["image"][begin : begin + batch_size]
        labels = np.asarray(arrays["label"][begin : begin + batch_size], np.int32)
        pad = batch_size - len(images)  # one compiled shape: pad the last batch, drop the padding's metrics
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            labels = np.concatenate([labels, np.repeat(labels[-1:], pad)])
        out = jax.device_get(metric_fn(params, {"tokens": encode(images), "label": labels}))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[: batch_size - pad]))
    result = {f"held_out_{k}": v / n for k, v in sums.items()}
    result["held_out_images"] = n
    logging.info("held-out split: %s over %d images in %.1f s", result, n, time.perf_counter() - t0)
    return result


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


@dataclasses.dataclass(frozen=True)
class _RealDigits:
    """What the generator evals compare samples with, made once per run (on every process): the real train and
    held-out (`data.eval_split`) arrays, the class-fidelity classifier (fitted on the held-out split), the digits
    FID extractor (fitted on the train split) and the held-out split's digits-FID statistics."""

    train: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    fidelity: Any  # jaxgen.eval.class_fidelity.ClassFidelity
    fid: Any  # jaxgen.eval.digits_fid.DigitsFID
    ref: Any  # jaxgen.eval.metrics.FeatureStats of held_out
    seed: int

    def floor(self, labels: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation of the digits FID of real train images with the class counts of `labels`
        (as many as the samples), over 10 random draws."""
        floors = self.fid.real_floors(self.train["image"], self.train["label"], labels, self.ref, seed=self.seed)
        return float(np.mean(floors)), float(np.std(floors))


def _real_digits(config) -> _RealDigits:
    from jaxgen.eval.class_fidelity import fit_classifier
    from jaxgen.eval.digits_fid import DigitsFID

    t0 = time.perf_counter()
    held_out = data_lib.load_eval_arrays(config.data, config.data.eval_split)
    train = data_lib.load_eval_arrays(config.data, config.data.train_split)
    seed = int(config.seed)
    fidelity = fit_classifier(held_out["image"], held_out["label"], seed=seed)
    fid = DigitsFID.fit(train["image"], train["label"], seed=seed)
    real = _RealDigits(train, held_out, fidelity, fid, fid.reference(held_out["image"]), seed)
    logging.info(
        "digits FID: classifier fitted on %d train images (held-out accuracy %.3f) in %.1f s",
        len(train["image"]), fid.accuracy(held_out["image"], held_out["label"]), time.perf_counter() - t0,
    )  # fmt: skip
    return real


def _digits_fid_callback(
    config, sampler, tok_params, batch: int, real: _RealDigits, writer: MetricsWriter, stage: str = "generator"
):
    """`fn(gen_params, step)` for `train_stage`: `eval.fid_samples` class-balanced samples (rounded up to whole
    batches of `batch`, the grid's size, so the sampler compiled for the grid serves), their digits FID and class
    fidelity, and the real floor for as many samples (mean and std over 10 draws), to metrics.jsonl + TensorBoard
    (stage "<stage>_eval") and the log. Every process samples (the sampler may be sharded); MetricsWriter writes
    on process 0 only."""
    classes = np.unique(real.held_out["label"]).astype(np.int32)
    num_batches = max(1, -(-int(config.eval.fid_samples) // batch))
    labels = (np.arange(num_batches * batch) % len(classes)).astype(np.int32)
    labels = classes[labels].reshape(num_batches, batch)
    floor, floor_std = real.floor(labels.reshape(-1))

    def evaluate(gen_params, step: int) -> None:
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(20_000 + int(config.seed)), step)
        images = np.concatenate(
            [_generate(sampler, gen_params, tok_params, y, jax.random.fold_in(key, i)) for i, y in enumerate(labels)]
        )
        x = images * 2.0 - 1.0  # the samplers' [0, 1] -> the data's [-1, 1]
        try:
            fid = real.fid.distance(x, real.ref)
        except ValueError as e:  # degenerate covariances (e.g. collapsed samples): log it, do not stop training
            logging.warning("[%s_eval] step %d: no digits FID: %s", stage, step, e)
            fid = float("nan")
        row = {
            "digits_fid": fid,
            "digits_fid_real_floor": floor,
            "digits_fid_real_floor_std": floor_std,
            "class_fidelity": real.fidelity.score(x, labels.reshape(-1))["class_fidelity"],
            "num_samples": len(x),
        }
        writer.write(step, row, stage=f"{stage}_eval")
        logging.info(
            f"[{stage}_eval] step %d: digits FID %.4g (real floor %.3g +- %.2g), class fidelity %.3f, %d samples, "
            "%.1f s",
            step, row["digits_fid"], floor, floor_std, row["class_fidelity"], len(x), time.perf_counter() - t0,
        )  # fmt: skip

    return evaluate


def _inception_fid(images01: np.ndarray, ref_images01: np.ndarray, floor_images01: np.ndarray) -> dict | None:
    """FID with the real FID Inception-v3 (pool features, ADM pipeline) of `images01` against `ref_images01`, and of
    `floor_images01` (real images, as many) against the same reference: `{"fid_inception", "fid_inception_real_floor",
    "fid_inception_images"}`; all `[N, H, W, C]` in [0, 1], 1 or 3 channels. None when no weights are installed."""
    from jaxgen.eval import metrics
    from jaxgen.eval.adm_npz import float_to_uint8
    from jaxgen.eval.inception import default_extractor

    extractor = default_extractor()
    if extractor is None:
        return None

    def stats(x01: np.ndarray):
        x = np.asarray(x01, np.float32)
        x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
        return metrics.feature_statistics(extractor.features(float_to_uint8(x))["pool"])

    ref = stats(ref_images01)
    fid = metrics.frechet_distance(stats(images01), ref) if np.all(np.isfinite(images01)) else float("nan")
    floor = metrics.frechet_distance(stats(floor_images01), ref)
    return {
        "fid_inception": float(fid),
        "fid_inception_real_floor": float(floor),
        "fid_inception_images": len(images01),
    }


def _generator_eval(
    config,
    sampler,
    gen_params,
    tok_params,
    grid_labels,
    workdir: Path,
    real: _RealDigits | None = None,
    grid_dir: Path | None = None,
) -> dict:
    """Class fidelity (samples for every class, scored by a classifier fit on the real held-out split) and the
    digits FID of the same samples to the held-out split, beside `digits_fid_real_floor` (+ `_std`: as many real
    train images, same classes, 10 draws); with `eval.inception_fid_images` = n > 0, the real-weight Inception FID
    of n samples against n held-out images beside that of n real train images (when the weights are installed)."""
    real = real if real is not None else _real_digits(config)
    images, labels = [], []
    for i in range(int(config.eval.sample_batches)):
        images.append(_generate(sampler, gen_params, tok_params, grid_labels, jax.random.key(10_000 + i)))
        labels.append(grid_labels)
    images, labels = np.concatenate(images), np.concatenate(labels)
    x = images * 2.0 - 1.0  # the classifiers read [-1, 1], as the data pipeline
    result = real.fidelity.score(x, labels)
    result["classifier_accuracy_real"] = float(real.fidelity.real_accuracy(real.train["image"], real.train["label"]))
    if len(x) >= 2:
        result["digits_fid"] = real.fid.distance(x, real.ref)
        result["digits_fid_real_floor"], result["digits_fid_real_floor_std"] = real.floor(labels)
        result["digits_fid_classifier_accuracy"] = real.fid.accuracy(real.held_out["image"], real.held_out["label"])
    n = min(int(config.eval.get("inception_fid_images", 0)), len(images), len(real.held_out["image"]))
    if n >= 2:
        t0 = time.perf_counter()
        to01 = lambda x: (x[:n] + 1.0) / 2.0  # the data pipeline's [-1, 1] -> [0, 1]
        fids = _inception_fid(images[:n], to01(real.held_out["image"]), to01(real.train["image"]))
        if fids is None:
            logging.info("fid_inception not reported: no FID Inception weights installed (docs/evaluation.md)")
        else:
            result.update(fids)
            logging.info("fid_inception %.4g (real floor %.4g; %d samples vs %d held-out) in %.1f s",
                         fids["fid_inception"], fids["fid_inception_real_floor"], n, n,
                         time.perf_counter() - t0)  # fmt: skip
    n = int(config.grid.per_class)
    _save_grid(
        images[: len(grid_labels)],
        (grid_dir or workdir) / "final_samples.png",
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
