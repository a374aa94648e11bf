"""The training binary: trains a config's tokenizer and generator, writes checkpoints, grids and a report.

    python -m jaxgen.main --config=configs/digits_var.py --workdir=workdir/digits_var
    python -m jaxgen.main --config=configs/digits_var.py:smoke --workdir=/tmp/smoke --config.train_generator.lr=1e-3

Rerunning with the same --workdir resumes from the last checkpoint. All the work is `train_and_evaluate`, which a
notebook can call the same way.
"""

from __future__ import annotations

import json
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgen.train.loop import TrainingError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, grids, report.json")


def _quiet_libraries(record) -> bool:
    """Keep jaxgen's INFO lines; other libraries (Orbax logs every save step by step) only from WARNING up."""
    # Python's level numbers: absl's logging.WARNING is its own scale (-1) and would let every record through.
    return record.levelno >= py_logging.WARNING or "jaxgen" in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    try:
        report = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        logging.debug("traceback", exc_info=True)  # shown with --verbosity=1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
