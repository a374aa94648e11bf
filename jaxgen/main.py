"""The training binary: trains a config's tokenizer and generator, writes checkpoints, grids and a report.

    python -m jaxgen.main --config=configs/digits_var.py --workdir=workdir/digits_var
    python -m jaxgen.main --config=configs/digits_var.py:smoke --workdir=/tmp/smoke --config.train_generator.lr=1e-3

Rerunning with the same --workdir resumes from the last checkpoint. All the work is `train_and_evaluate`, which a
notebook can call the same way.

A user error (read-only workdir, missing config section, damaged checkpoint, workdir of another model, ...) ends in
one `error: ...` line on stderr and exit status 1; `--verbosity=1` also logs its traceback. SIGTERM / SIGINT during
training save a checkpoint at the next step boundary and exit with status 143 / 130 and a line saying how to resume.

Several processes (docs/multi_process.md) run the same command: on a TPU pod or under SLURM `jax.distributed` finds
its settings itself; elsewhere add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. Compiled
programs are kept in a persistent cache (`--compile_cache`, default ~/.cache/jaxgen/xla; `off` disables it).
"""

from __future__ import annotations

import json
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgen import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, grids, report.json")


def _quiet_libraries(record) -> bool:
    """Keep jaxgen's INFO lines; other libraries (Orbax logs every save step by step) only from WARNING up."""
    # Python's level numbers: absl's logging.WARNING is its own scale (-1) and would let every record through.
    return record.levelno >= py_logging.WARNING or "jaxgen" in record.pathname


def check_sections(config, source: str) -> None:
    """The top-level sections a training run reads, present before anything is built (else one line naming them)."""
    from jaxgen.families import family_of

    stages = tuple(config.get("stages", ()))
    cli.require_sections(config, ["stages", "data", "parallel"], source)
    family = family_of(config)
    cli.require_sections(
        config, [family.tokenizer_key, family.generator_key], source, f"family {config.get('family')!r}"
    )
    cli.require_sections(config, [f"train_{s}" for s in stages], source, f"stages={stages}")
    if any(s != "tokenizer" for s in stages):
        cli.require_sections(config, ["sampling", "grid", "eval"], source, "the generator stages sample and score")


def run(config, workdir: str, source: str) -> dict:
    """Check the config's sections and the workdir, then train. Imports here, not at the top: flags are parsed
    (and a bad one reported) without loading JAX, and a Ctrl-C while loading is a one-line error too."""
    from jaxgen.train.loop import TrainingError, train_and_evaluate

    check_sections(config, source)
    if "://" not in workdir:  # a bucket (gs://...): Orbax reports what it cannot write
        cli.check_writable_dir(workdir)
    cli.start_processes()
    return cli.run_user_command(train_and_evaluate, config, workdir, user_errors=(TrainingError,))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    source = config_flags.get_config_filename(flags.FLAGS["config"])
    report = cli.run_user_command(run, _CONFIG.value, _WORKDIR.value, source)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
