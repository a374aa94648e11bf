"""What a run shows while it trains: a parameter overview, a progress line, metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from jaxgen.paths import as_path, host_cache_dir, is_url


def parameter_overview(params: Any, shardings: Any = None, max_rows: int = 40) -> str:
    """A table of parameter paths, shapes, counts (and mesh partition specs), with the total."""
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    rows = [(k, tuple(v.shape), int(np.prod(v.shape)), str(getattr(specs.get(k), "spec", ""))) for k, v in flat.items()]
    total = sum(r[2] for r in rows)
    width = min(max(len(r[0]) for r in rows), 70)
    lines = [f"{'parameter':<{width}} {'shape':<22} {'count':>12}  sharding"]
    shown = rows if len(rows) <= max_rows else [*rows[: max_rows // 2], ("...", (), 0, ""), *rows[-max_rows // 2 :]]
    for name, shape, count, spec in shown:
        lines.append(f"{name[-width:]:<{width}} {shape!s:<22} {count:>12,}  {spec}")
    lines.append(f"total: {total:,} parameters in {len(rows)} arrays ({total * 4 / 2**20:.1f} MiB as float32)")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class MetricsWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl` and the same scalars to TensorBoard event
    files under `workdir/tensorboard/` (tensorboardX: no TensorFlow needed). Only process 0 writes. A bucket
    workdir (gs://...) gets metrics.jsonl rewritten whole at each write and TensorBoard events in a local cache dir."""

    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            workdir = as_path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._path, self._lines = workdir / "metrics.jsonl", None
            if is_url(workdir):  # object stores cannot append: keep the lines, rewrite the file on each write
                self._lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
                self._jsonl = None
                tensorboard = host_cache_dir("tensorboard", os.fspath(workdir))
                logging.info("TensorBoard events of %s are written to %s (this host)", workdir, tensorboard)
            else:
                self._jsonl = open(self._path, "a")
                tensorboard = workdir / "tensorboard"
            self._tb = SummaryWriter(os.fspath(tensorboard))

    def write(self, step: int, metrics: dict[str, Any], stage: str = "") -> None:
        """One line `{"step": ..., "stage": ..., name: value, ...}`; TensorBoard tags are `stage/name`."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        line = json.dumps({"step": int(step), "stage": stage, **scalars}) + "\n"
        if self._jsonl is None:
            self._lines.append(line)
            self._path.write_text("".join(self._lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for k, v in scalars.items():
            if math.isfinite(v):
                self._tb.add_scalar(f"{stage}/{k}" if stage else k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


class Progress:
    """`step/total loss steps/s ETA`: a redrawn line on a terminal, a log line per report otherwise."""

    def __init__(self, name: str, start: int, total: int):
        self.name, self.total, self.start = name, total, start
        self.t0, self.last_step, self.last_t = time.perf_counter(), start, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_t, 1e-9)
        self.last_step, self.last_t = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "psnr", "accuracy"))
        line = (
            f"[{self.name}] step {step}/{self.total} ({100 * step / self.total:.0f}%) {shown} "
            f"| {rate:.2f} steps/s | ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            sys.stderr.flush()
        else:
            logging.info(line)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        logging.info(
            "[%s] done: %d steps in %s",
            self.name,
            self.last_step - self.start,
            _fmt_time(time.perf_counter() - self.t0),
        )
