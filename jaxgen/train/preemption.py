"""Stop cleanly on SIGTERM / SIGINT: save a checkpoint at the next step boundary, then raise `Preempted`.

TPU VMs (and most schedulers) are preempted with SIGTERM and a grace period of ~30 s; Ctrl-C sends SIGINT. Inside
`stop_on_signals()` either signal only sets a flag; `train_stage` asks `stop.requested()` after every step, saves the
train state and the data iterator's position with the stage's CheckpointManager, waits for the write to finish, and
raises `Preempted` ("stopped at step N by SIGTERM; checkpoint saved to ...; rerun the same command to resume").

- Later signals while that checkpoint is written are logged and otherwise ignored, so a second Ctrl-C cannot cut a
  save short. (SIGKILL still can: Orbax writes each step to a temporary directory and renames it only when complete,
  so a killed save leaves the previous checkpoint as the latest.)
- Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the context is a no-op
  and `requested()` stays False. The previous handlers are restored on exit.
- Several processes: every process must stop at the same step, or the ones that did not get the signal would hang in
  the next step's collectives while the others save. With `jax.process_count() > 1`, `requested()` therefore takes
  the maximum of every process's flag (`multihost_utils.process_allgather`, one tiny host collective per step), so
  all agree; with one process it only reads a Python attribute (no device work, no sync). A real multi-process test
  is a later issue (Step 11); `tests/test_preemption.py` fakes the process count.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from absl import logging

from jaxgen.paths import as_path
from jaxgen.train.errors import TrainingError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(TrainingError):
    """Training stopped on a signal after saving a checkpoint; rerunning the same command resumes from it.

    `exit_code` is the shell's convention for death by that signal (128 + signum: 143 SIGTERM, 130 SIGINT), so
    a scheduler sees the same status as if the default handler had run."""

    def __init__(self, stage: str, step: int, total_steps: int, signum: int, checkpoint: Path | str):
        self.stage, self.step, self.signum, self.checkpoint = stage, step, signum, as_path(checkpoint)
        self.exit_code = 128 + int(signum)
        super().__init__(
            f"[{stage}] stopped at step {step}/{total_steps} by {signal.Signals(signum).name}; checkpoint saved to "
            f"{checkpoint}; rerun the same command to resume"
        )


class StopRequest:
    """The flag the handlers set. `signum` is the first signal received (None: none yet)."""

    def __init__(self):
        self.signum: int | None = None
        self._multi = jax.process_count() > 1

    def requested(self) -> bool:
        """Whether to stop after this step. Every process must call it at every step (a collective when
        `jax.process_count() > 1`, so that all processes stop at the same step)."""
        if not self._multi:
            return self.signum is not None
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
        agreed = int(flags.max())
        if agreed and self.signum is None:
            self.signum = agreed  # another process got the signal: stop with it
        return agreed != 0


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[StopRequest]:
    """Within the context, `signals` set `StopRequest.signum` instead of terminating / raising KeyboardInterrupt."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        logging.debug("not the main thread: SIGTERM / SIGINT keep their handlers (no checkpoint on preemption)")
        yield stop
        return

    def handler(signum, frame):
        del frame
        name = signal.Signals(signum).name
        if stop.signum is None:
            stop.signum = signum
            logging.warning("%s received: saving a checkpoint after this step, then stopping", name)
        else:
            logging.warning("%s received again: still saving the checkpoint, stopping as soon as it is written", name)

    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
