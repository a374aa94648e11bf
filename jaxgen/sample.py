"""Class-conditional sampling binary: a grid of samples per class as PNG, the token ids as .npz, a report as JSON; or,
with `--num_samples=N`, N class-balanced samples as the ADM evaluator's npz, in resumable chunks.

    python -m jaxgen.sample --config=configs/var_tiny.py --workdir=workdir/var_tiny
    python -m jaxgen.sample --config=configs/var_imagenet.py:d16 --config.checkpoint=DIR --workdir=...
    python -m jaxgen.sample --config=configs/digits_var.py --config.checkpoint=workdir/digits_var --workdir=...
    python -m jaxgen.sample --config=configs/var_imagenet.py:d16 --config.checkpoint=DIR --workdir=... \
        --num_samples=50000 [--chunk_size=1000 --batch_size=250]   # -> WORKDIR/samples_50000x256x256x3.npz

`config.checkpoint`: a directory written by `python -m jaxgen.convert`, or a training run's workdir (its
`generator/export`: the EMA params of both models); random weights when empty. The training and the sampling
binary read the same config file. A user error ends in one `error:` line (the traceback with `--verbosity=1`).

`--num_samples=N` (see `sample_npz`): sample i has class i % num_classes; chunk c (images c * chunk_size ..) is drawn
with the key fold_in(fold_in(sampling_key(config), c), batch) per batch of `--batch_size` images, split over this
process's devices (data parallel), and written to WORKDIR/samples/chunk_{c:05d}.npz (arr_0 uint8, arr_1 labels,
atomically). A rerun skips the chunks that exist and open fine (a crash at 40,000 keeps 40,000), regenerates damaged
ones, and refuses chunks made with another config or other flags. With several processes (hosts), process p makes
the chunks c with c % P == p; when all exist, process 0 streams them into WORKDIR/samples_{N}x{H}x{W}x3.npz (ADM's
`arr_0` + `arr_1`, one chunk in memory at a time) and writes report.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from jaxgen import cli
from jaxgen.convert.common import count_params
from jaxgen.eval.adm_npz import NpzImages, float_to_uint8, write_npz, write_npz_stream
from jaxgen.eval.grids import save_grid
from jaxgen.families import config_section, family_models, init_family_params, model_sections, param_shapes
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.pretrained import load_pretrained

AUTO_BATCH_CAP = 250  # --batch_size=0 picks the largest multiple of the device count up to this dividing chunk_size

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the grid, tokens and report are written")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 0, "0: the class grid (config.grid); N > 0: N class-balanced samples as an ADM-evaluator npz, "
    "made in resumable chunks under WORKDIR/samples"
)  # fmt: skip
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1000, "images per chunk file (a multiple of --batch_size)")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "images per sampler call, split over this process's devices (a multiple of their number); "
    f"0: the largest multiple of the device count <= {AUTO_BATCH_CAP} that divides --chunk_size"
)  # fmt: skip


def init_or_load(config):
    """(family, tokenizer, generator, params) with params = {tokenizer key: ..., generator key: ...} from
    `config.checkpoint` (shapes and family checked against the config) or, if empty, a seeded random init."""
    family, sections = model_sections(config)
    tokenizer, generator = family_models(family, sections)
    if generator is None:
        raise ValueError(f"config has no `{family.generator_key}` section: there is no generator to sample")
    if config.get("checkpoint"):
        shapes = param_shapes(family, tokenizer, generator)
        _, params = load_pretrained(config.checkpoint, shapes, family=family.name, sections=sections)
    else:
        params = init_family_params(family, tokenizer, generator, config.seed)
    return family, tokenizer, generator, params


def sample_grid(config, workdir: str | Path) -> dict:
    """Sample `config.grid.per_class` images for each of `config.grid.classes`; write grid.png, samples.npz (labels,
    images and the token ids) and report.json under `workdir`; return the report."""
    workdir = Path(workdir)
    family, tokenizer, generator, params = init_or_load(config)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, tree in params.items():
        logging.info("%s: %.2fM params", name, count_params(tree) / 1e6)
    classes = tuple(config.grid.classes)
    labels = np.repeat(np.asarray(classes, np.int32), config.grid.per_class)
    sampler = family.sampler(generator, tokenizer, config.sampling.to_dict())
    t0 = time.perf_counter()
    out = sampler(params[family.generator_key], params[family.tokenizer_key], labels, sampling_key(config))
    images = np.asarray(jax.device_get(out.images))
    wall_s = time.perf_counter() - t0  # includes the one compile; experiments/bench_*_sampling.py separate them
    grid_path = save_grid(
        images,
        workdir / "grid.png",
        nrow=config.grid.per_class,
        row_labels=[f"class {c}" for c in classes],
        scale=max(1, 128 // images.shape[1]),
    )
    np.savez(workdir / "samples.npz", labels=labels, images=images, **out.token_arrays())
    report = {
        "family": family.name,
        "grid": str(grid_path),
        "num_images": len(labels),
        "image_size": int(images.shape[1]),
        "wall_s_with_compile": round(wall_s, 3),
        "checkpoint": config.get("checkpoint") or None,
        "device": jax.devices()[0].device_kind,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def sampling_key(config) -> jax.Array:
    """The PRNG key of a config's grid: `config.seed + 1` (folded with the chunk index: a --num_samples chunk's)."""
    return jax.random.key(int(config.seed) + 1)


# ---- --num_samples: class-balanced samples as an ADM npz, in resumable chunks ---------------------------------------


class DataParallelSampler:
    """The config's sampler with both models' params replicated over a data mesh of `devices` (default: this
    process's local devices): `sampler(labels int32 [B], key) -> float images [B, H, W, 3]` in [0, 1] (a jax.Array,
    not yet fetched), the labels split over the devices (B a multiple of `num_devices`), the models' activation
    constraints on (`partition.activation_rules`). `models`: an `init_or_load(config)` result to reuse."""

    def __init__(self, config, devices=None, models=None):
        family, tokenizer, generator, params = models or init_or_load(config)
        self.family = family
        self.mesh = mesh_lib.create_mesh({"data": -1}, jax.local_devices() if devices is None else devices)
        self.num_devices = int(self.mesh.size)
        self.labels_sharding = partition.batch_sharding(self.mesh)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.generator_params = jax.device_put(params[family.generator_key], self.replicated)
        self.tokenizer_params = jax.device_put(params[family.tokenizer_key], self.replicated)
        self.sampler = family.sampler(generator, tokenizer, config.sampling.to_dict())
        self.num_classes = int(generator.config.num_classes)
        self.image_size = int(family.image_size(tokenizer, generator))

    def __call__(self, labels, key: jax.Array) -> jax.Array:
        labels = np.asarray(labels, np.int32)
        if len(labels) % self.num_devices:
            raise ValueError(f"a batch of {len(labels)} does not split over {self.num_devices} devices")
        with partition.activation_rules(self.mesh):
            out = self.sampler(
                self.generator_params,
                self.tokenizer_params,
                jax.device_put(labels, self.labels_sharding),
                jax.device_put(key, self.replicated),
            )
        return out.images


def check_chunking(num_samples: int, chunk_size: int, batch_size: int, num_devices: int) -> int:
    """The batch size (`batch_size`, or with 0 the largest multiple of `num_devices` <= AUTO_BATCH_CAP that divides
    `chunk_size`); a ValueError naming the flags when the numbers do not fit together."""
    if num_samples < 1:
        raise ValueError(f"--num_samples={num_samples}: give the number of images to sample (e.g. 50000)")
    if chunk_size < 1:
        raise ValueError(f"--chunk_size={chunk_size} must be >= 1 (images per chunk file, e.g. 1000)")
    if batch_size == 0:
        fits = [b for b in range(num_devices, max(AUTO_BATCH_CAP, num_devices) + 1, num_devices) if chunk_size % b == 0]
        if not fits:
            raise ValueError(
                f"--chunk_size={chunk_size} is not a multiple of the {num_devices} devices, so no batch splits over "
                f"them: pass a --chunk_size that is (e.g. {num_devices * max(1, AUTO_BATCH_CAP // num_devices)}) and "
                f"a --batch_size"
            )
        return max(fits)
    if batch_size < 0 or batch_size % num_devices:
        raise ValueError(
            f"--batch_size={batch_size} must be a positive multiple of the {num_devices} devices it is split over "
            f"(e.g. {num_devices * max(1, AUTO_BATCH_CAP // num_devices)}), or 0 to choose one"
        )
    if chunk_size % batch_size:
        raise ValueError(
            f"--chunk_size={chunk_size} must be a multiple of --batch_size={batch_size} (a chunk is whole batches): "
            f"e.g. --chunk_size={batch_size * max(1, round(chunk_size / batch_size))}"
        )
    return batch_size


def chunk_path(workdir: str | Path, chunk: int) -> Path:
    return Path(workdir) / "samples" / f"chunk_{chunk:05d}.npz"


def chunk_labels(first: int, n: int, num_classes: int) -> np.ndarray:
    """Class-balanced labels of images first .. first + n - 1: image i has class i % num_classes."""
    return ((first + np.arange(n)) % num_classes).astype(np.int32)


def _settings(config, family, chunk_size: int, batch_size: int) -> dict:
    """What decides a chunk's images, as JSON data (stored in each chunk as `meta`, compared on resume)."""
    settings = {
        "family": family.name,
        family.tokenizer_key: config_section(config, family.tokenizer_key),
        family.generator_key: config_section(config, family.generator_key),
        "sampling": config.sampling.to_dict(),
        "seed": int(config.seed),
        "checkpoint": config.get("checkpoint") or "",
        "chunk_size": chunk_size,
        "batch_size": batch_size,
    }
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _chunk_problem(path: Path, labels: np.ndarray, size: int, settings: dict) -> str | None:
    """None when the chunk at `path` is complete (these labels, size x size images) and made with `settings`; else
    why it must be made (again). A chunk made with other settings is an error: resuming would mix two runs."""
    if not path.exists():
        return "missing"
    try:
        chunk = NpzImages(path)
        meta, stored_labels = chunk.array("meta"), chunk.labels
        made_with = None if meta is None else json.loads(str(meta.item()))
    except (ValueError, OSError) as e:  # a damaged zip / npy header / JSON (json.JSONDecodeError is a ValueError)
        return f"damaged ({cli.one_line(e, 300)})"
    if not isinstance(made_with, dict):
        return "has no jaxgen.sample settings"
    old, new = _flat(made_with), _flat(settings)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "<none>") != new.get(k, "<none>"))
    if diff:
        said = ", ".join(f"{k}={old.get(k, '<none>')!r} (now {new.get(k, '<none>')!r})" for k in diff[:4])
        raise ValueError(
            f"{path} was made with other settings: {said}{' ...' if len(diff) > 4 else ''}; rerun with the config "
            f"and flags it was made with to resume, or sample into another --workdir (or delete {path.parent})"
        )
    if chunk.num_images != len(labels) or chunk.shape != (size, size, 3):
        return f"holds {chunk.num_images} x {list(chunk.shape)} images, not {len(labels)} x {[size, size, 3]}"
    if stored_labels is None or not np.array_equal(stored_labels, labels):
        return "has other labels"
    return None


def _sample_chunk(sampler: DataParallelSampler, key: jax.Array, first: int, n: int, batch_size: int) -> np.ndarray:
    """uint8 images of samples first .. first + n - 1 (whole batches, the extra ones of the last dropped; batch b
    drawn with fold_in(key, b)); the next batch is dispatched before the previous one is fetched, so the devices do
    not wait for the host."""
    num_batches = -(-n // batch_size)
    images, pending = [], None
    for b in range(num_batches):
        out = sampler(chunk_labels(first + b * batch_size, batch_size, sampler.num_classes), jax.random.fold_in(key, b))
        if pending is not None:
            images.append(float_to_uint8(jax.device_get(pending)))
        pending = out
    images.append(float_to_uint8(jax.device_get(pending)))
    return np.concatenate(images)[:n]


def sample_npz(
    config,
    workdir: str | Path,
    num_samples: int,
    chunk_size: int = 1000,
    batch_size: int = 0,
    *,
    sampler: DataParallelSampler | None = None,
) -> dict:
    """`num_samples` class-balanced samples (image i has class i % num_classes) as the ADM evaluator's npz
    `workdir/samples_{N}x{H}x{W}x3.npz` (arr_0 uint8, arr_1 labels), made in chunks `workdir/samples/chunk_{c:05d}.npz`
    of `chunk_size` images (the last one shorter), chunk c with the key fold_in(sampling_key(config), c). Chunks that
    exist and open fine are kept; process p of P makes the chunks c with c % P == p, process 0 writes the npz and
    report.json once all exist. `sampler`: a `DataParallelSampler` of this config to reuse. Returns the report."""
    workdir = Path(workdir)
    num_devices = sampler.num_devices if sampler is not None else jax.local_device_count()
    batch_size = check_chunking(num_samples, chunk_size, batch_size, num_devices)
    sampler = sampler or DataParallelSampler(config)
    size, num_classes, family = sampler.image_size, sampler.num_classes, sampler.family
    if num_classes < 1:
        raise ValueError(f"the generator has num_classes={num_classes}: class-balanced sampling needs >= 1 class")
    settings = _settings(config, family, chunk_size, batch_size)
    num_chunks = -(-num_samples // chunk_size)
    labels_of = lambda c: chunk_labels(c * chunk_size, min(chunk_size, num_samples - c * chunk_size), num_classes)
    process, processes = jax.process_index(), jax.process_count()
    mine = range(process, num_chunks, processes)
    todo = []
    for c in mine:
        problem = _chunk_problem(chunk_path(workdir, c), labels_of(c), size, settings)
        if problem is not None:
            if problem != "missing":
                logging.warning("%s %s: making it again", chunk_path(workdir, c), problem)
            todo.append(c)
    logging.info(
        "%d images in %d chunks of %d (batch %d over %d devices, process %d of %d): %d chunks here to make, %d kept",
        num_samples, num_chunks, chunk_size, batch_size, num_devices, process, processes, len(todo),
        len(mine) - len(todo),
    )  # fmt: skip
    base_key = sampling_key(config)
    t0 = time.perf_counter()
    made = 0
    with tqdm(total=sum(len(labels_of(c)) for c in todo), unit="img", desc="sampling", disable=None) as bar:
        for c in todo:
            t_chunk, labels = time.perf_counter(), labels_of(c)
            images = _sample_chunk(sampler, jax.random.fold_in(base_key, c), c * chunk_size, len(labels), batch_size)
            write_npz(chunk_path(workdir, c), images, labels, extra={"meta": np.array(json.dumps(settings))})
            made += len(labels)
            bar.update(len(labels))
            logging.info(
                "%s: %d images in %.1f s", chunk_path(workdir, c).name, len(labels), time.perf_counter() - t_chunk
            )
    sample_s = time.perf_counter() - t0
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxgen.sample: every process has written its chunks")
    report = {
        "family": family.name,
        "num_images": num_samples,
        "image_size": size,
        "num_classes": num_classes,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "chunks": num_chunks,
        "chunks_made": len(todo),
        "chunks_kept": len(mine) - len(todo),
        "sample_s_with_compile": round(sample_s, 3),
        "images_per_s": round(made / sample_s, 3) if made else None,
        "devices": num_devices,
        "processes": processes,
        "checkpoint": config.get("checkpoint") or None,
        "device": jax.local_devices()[0].device_kind,
    }
    if process != 0:
        return report
    problems = {c: _chunk_problem(chunk_path(workdir, c), labels_of(c), size, settings) for c in range(num_chunks)}
    problems = {c: p for c, p in problems.items() if p is not None}
    if problems:
        listed = ", ".join(f"{chunk_path(workdir, c).name} {p}" for c, p in list(problems.items())[:3])
        raise ValueError(
            f"after every process finished, {len(problems)} chunks are missing or damaged ({listed}): rerun the same "
            f"command to make them (with several processes, --workdir must be on a filesystem they all see)"
        )
    final = workdir / f"samples_{num_samples}x{size}x{size}x3.npz"
    t0 = time.perf_counter()
    batches = (b for c in range(num_chunks) for b in NpzImages(chunk_path(workdir, c)).iter_batches(256))
    write_npz_stream(final, batches, num_samples, (size, size, 3), labels=chunk_labels(0, num_samples, num_classes))
    report |= {"npz": str(final), "write_s": round(time.perf_counter() - t0, 3)}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    logging.info("wrote %s", final)
    return report


def run(config, workdir: str) -> dict:
    cli.check_writable_dir(workdir)
    cli.start_processes()
    return sample_grid(config, workdir)


def run_samples(config, workdir: str, num_samples: int, chunk_size: int, batch_size: int) -> dict:
    cli.check_writable_dir(workdir)
    cli.start_processes()  # before anything touches a device; jax.distributed only with several processes
    check_chunking(num_samples, chunk_size, batch_size, jax.local_device_count())  # before the models are built
    return sample_npz(config, workdir, num_samples, chunk_size, batch_size)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NUM_SAMPLES.value < 0:
        cli.fail(f"--num_samples={_NUM_SAMPLES.value} must be >= 0 (0: the class grid)", cli.EXIT_USAGE)
    if _NUM_SAMPLES.value:
        args = (_NUM_SAMPLES.value, _CHUNK_SIZE.value, _BATCH_SIZE.value)
        report = cli.run_user_command(run_samples, _CONFIG.value, _WORKDIR.value, *args)
    else:
        report = cli.run_user_command(run, _CONFIG.value, _WORKDIR.value)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
