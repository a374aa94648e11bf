"""SIGTERM / SIGINT mid-stage: the binary saves at the next step boundary, exits with a line saying how to resume, and
the rerun ends bit-identical to an uninterrupted run (params, optimizer state, EMA, step, RNG, data position).
Plus the signal context itself: a second signal during the save, restored handlers, other threads, several hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxgen.train import preemption

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}  # "dir": this module's JAX compilation cache (set by the `compilation_cache` fixture)
STEPS = 12
# digits_var:smoke at batch 16: a tokenizer step takes ~0.3-1 s on a shared 2-core CPU, so a signal sent once
# metrics.jsonl shows step 3 lands well before step 12.
BASE = [
    "--config=configs/digits_var.py:smoke",
    "--config.train_tokenizer.batch_size=16",
    "--config.train_generator.batch_size=16",
]


def _stage_flags(stage: str, steps: int = STEPS) -> list[str]:
    """`steps` steps, a metrics line every step, and no checkpoint before the last step except the preemption one."""
    t = f"--config.train_{stage}"
    return [f"{t}.steps={steps}", f"{t}.log_every=1", f"{t}.ckpt_every={steps}", f"{t}.sample_every=0"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """The training binary with stdout / stderr in files (`log`.out / `log`.err): a pipe nobody reads would block it.
    One CPU device (conftest's fake 8 only slow the compile), and one compilation cache for all runs of this module:
    the reference run compiles, the others load the same executables (~2x faster under load)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(_CACHE["dir"]))
    return subprocess.Popen(
        [sys.executable, "-m", "jaxgen.main", *args],
        cwd=REPO,
        env=env,
        stdout=open(log.with_suffix(".out"), "w"),
        stderr=open(log.with_suffix(".err"), "w"),
        text=True,
    )


def _run(args: list[str], log: Path, timeout: float = 600) -> str:
    proc = _start(args, log)
    rc = proc.wait(timeout=timeout)
    err = log.with_suffix(".err").read_text()
    assert rc == 0, err[-3000:]
    return err


def _wait_for_step(proc: subprocess.Popen, workdir: Path, stage: str, step: int, timeout: float = 300) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(x["stage"] == stage and x["step"] >= step for x in lines):
                return
        time.sleep(0.02)
    raise AssertionError(f"{stage} never reached step {step} (exit code {proc.poll()})")


def _final(workdir: Path, stage: str) -> tuple[int, dict, str]:
    """(step, the whole train state as numpy, the data iterator's saved state) of the stage's latest checkpoint."""
    ckpts = workdir / stage / "checkpoints"
    with ocp.CheckpointManager(ckpts) as mngr:
        step = mngr.latest_step()
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    data = (ckpts / str(step) / "data" / "process_0-of-1.json").read_text()
    return step, state, data


def _assert_bit_identical(ref: Path, resumed: Path, stage: str) -> None:
    step_a, a, data_a = _final(ref, stage)
    step_b, b, data_b = _final(resumed, stage)
    assert step_a == step_b == STEPS
    assert set(a) >= {"params", "opt_state", "ema_params", "step", "rng"}
    assert jax.tree.structure(a) == jax.tree.structure(b)
    paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a), strict=True)
    leaves_b = jax.tree.leaves(b)
    for path, x, y in zip(paths_a, leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{stage}: {jax.tree_util.keystr(path)} differs"
    assert data_a == data_b, f"data iterator position: {data_a} vs {data_b}"


def _interrupt_and_resume(args: list[str], workdir: Path, stage: str, sig: int, tmp_path: Path) -> int:
    """Signal the run once `stage` logged step 3; check the exit and its message; rerun to the end. Returns the
    step the run stopped at."""
    run = [*args, f"--workdir={workdir}"]
    proc = _start(run, tmp_path / "interrupted")
    _wait_for_step(proc, workdir, stage, 3)
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=300)
    err = (tmp_path / "interrupted.err").read_text()
    assert rc == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
    name = signal.Signals(sig).name
    ckpts = workdir / stage / "checkpoints"
    line = errors[0]
    assert f"error: [{stage}] stopped at step " in line and f"/{STEPS} by {name}; checkpoint saved to {ckpts}/" in line
    assert line.endswith("; rerun the same command to resume"), line
    stopped = int(line.split("stopped at step ")[1].split("/")[0])
    assert 3 <= stopped < STEPS, line
    with ocp.CheckpointManager(ckpts) as mngr:
        assert mngr.all_steps() == [stopped]  # the preemption checkpoint, complete (ckpt_every is the last step)

    err = _run(run, tmp_path / "resumed")
    assert f"[{stage}] resumed from step {stopped}" in err
    return stopped


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    _CACHE["dir"] = tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def tokenizer_ref(tmp_path_factory) -> tuple[list[str], Path]:
    """A tokenizer-only run of STEPS steps, uninterrupted: the reference, and a tokenizer export for the generator."""
    workdir = tmp_path_factory.mktemp("tokenizer_ref")
    args = [*BASE, "--config.stages=('tokenizer',)", *_stage_flags("tokenizer")]
    _run([*args, f"--workdir={workdir / 'run'}"], workdir / "ref")
    return args, workdir / "run"


def test_sigterm_mid_tokenizer_stage_saves_and_resumes_bit_identical(tokenizer_ref, tmp_path):
    args, ref = tokenizer_ref
    _interrupt_and_resume(args, tmp_path / "run", "tokenizer", signal.SIGTERM, tmp_path)
    _assert_bit_identical(ref, tmp_path / "run", "tokenizer")


@pytest.mark.slow
def test_sigint_mid_generator_stage_saves_and_resumes_bit_identical(tokenizer_ref, tmp_path):
    """Generator-only runs on the reference tokenizer's export (3 runs of the binary: ~1.5-3 min on 2 cores)."""
    _, tok = tokenizer_ref
    args = [
        *BASE,
        "--config.stages=('generator',)",
        f"--config.tokenizer_checkpoint={tok / 'tokenizer' / 'export'}",
        *_stage_flags("generator"),
    ]
    _run([*args, f"--workdir={tmp_path / 'ref'}"], tmp_path / "ref")
    _interrupt_and_resume(args, tmp_path / "run", "generator", signal.SIGINT, tmp_path)
    _assert_bit_identical(tmp_path / "ref", tmp_path / "run", "generator")


# ---- the signal context -------------------------------------------------------------------------------------------


def test_signals_set_the_flag_a_second_one_is_ignored_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with preemption.stop_on_signals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before os.kill returns
        os.kill(os.getpid(), signal.SIGINT)  # while "saving": must neither kill nor raise KeyboardInterrupt
        time.sleep(0.01)
        assert stop.requested() and stop.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_outside_the_main_thread_it_is_a_no_op():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with preemption.stop_on_signals() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"handler": before, "requested": False}


def test_several_processes_stop_together_when_any_one_got_the_signal(monkeypatch):
    """Faked with 2 processes: the flag is all-gathered every step, so a signal on the other host stops this one
    at the same step, with that host's signal; no signal anywhere: no stop."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    calls = []
    other = {"signum": 0}

    def fake_allgather(x):
        calls.append(int(x))
        return np.asarray([int(x), other["signum"]], np.int32)

    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    stop = preemption.StopRequest()
    assert not stop.requested() and calls == [0]
    other["signum"] = int(signal.SIGTERM)
    assert stop.requested() and stop.signum == signal.SIGTERM and calls == [0, 0]


def test_preempted_is_a_training_error_with_the_signal_exit_code():
    from jaxgen.train.loop import TrainingError

    e = preemption.Preempted("generator", 7, 12, signal.SIGTERM, "/w/generator/checkpoints/7")
    assert isinstance(e, TrainingError) and e.exit_code == 143
    assert str(e) == (
        "[generator] stopped at step 7/12 by SIGTERM; checkpoint saved to /w/generator/checkpoints/7; "
        "rerun the same command to resume"
    )


def test_a_signal_after_the_loss_went_nan_saves_nothing(tmp_path, monkeypatch):
    """In process (8 fake devices): the stop is asked for at step 3 of a run whose loss is already NaN (lr 1e30);
    the preemption save checks the loss first, so the NaN stop wins and no checkpoint holds the broken state."""
    from jaxgen.config_util import load_config
    from jaxgen.train.loop import TrainingError, train_and_evaluate

    cfg = load_config(str(REPO / "configs/digits_var.py:smoke"))
    cfg.stages = ("tokenizer",)
    cfg.vae.update(ch=32, vocab_size=32, z_channels=8)
    cfg.train_tokenizer.update(
        steps=12, batch_size=16, log_every=6, ckpt_every=12, sample_every=0, lr=1e30, warmup_steps=0
    )
    calls = []

    def requested(self):
        calls.append(1)
        if len(calls) == 3:
            self.signum = int(signal.SIGTERM)
        return self.signum is not None

    monkeypatch.setattr(preemption.StopRequest, "requested", requested)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) by step 3; .*No checkpoint had been written") as e:
        train_and_evaluate(cfg, tmp_path)
    assert not isinstance(e.value, preemption.Preempted)
    ckpts = tmp_path / "tokenizer" / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]
