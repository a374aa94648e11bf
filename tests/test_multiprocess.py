"""Several real JAX processes on 127.0.0.1 (gloo CPU collectives): one run of `jaxgen.main` on a global mesh.

Two processes with 2 CPU devices each train the digits VAR smoke model (both stages: tokenizer, pretokenizing, the
generator, its evals and exports), one is killed after a checkpoint, both are relaunched and resume; the final
params equal those of one process with 4 devices. Also: a coordinator that never answers, processes started with
different configs, bad flags. Every process runs under a time limit and is killed if the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]

# digits_var:smoke made smaller (the tests' model of tests/test_train.py), 8 generator steps, a checkpoint every 2.
TINY = [
    "--config=configs/digits_var.py:smoke",
    "--config.vae.ch=32", "--config.vae.vocab_size=32", "--config.vae.z_channels=8",
    "--config.var.depth=1", "--config.var.embed_dim=32", "--config.var.num_heads=2",
    "--config.train_tokenizer.steps=4", "--config.train_generator.steps=8",
    "--config.train_tokenizer.batch_size=16", "--config.train_generator.batch_size=16",
    "--config.train_tokenizer.sample_every=0", "--config.train_generator.sample_every=4",
    "--config.train_tokenizer.log_every=2", "--config.train_generator.log_every=2",
    "--config.train_tokenizer.ckpt_every=2", "--config.train_generator.ckpt_every=2",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, devices: int, cache: Path | None = None) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAXGEN_COMPILE_CACHE=str(cache) if cache else "off",
    )
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxgen.main", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _start_processes(args, tmp: Path, tag: str, n: int = 2, devices: int = 2, port=None, extra=None, **kw):
    """`n` processes of one run (coordinator bound to 127.0.0.1, 10 s heartbeat); `extra[i]`: process i's own
    flags. Logs: tmp/<tag>_<i>.log."""
    port = port or _free_port()
    dist = [
        f"--coordinator_address=127.0.0.1:{port}", f"--coordinator_bind_address=127.0.0.1:{port}",
        f"--num_processes={n}", "--heartbeat_timeout_s=10", "--initialization_timeout_s=60",
    ]  # fmt: skip
    return [
        _start([*args, *dist, f"--process_id={i}", *(extra or {}).get(i, [])], tmp / f"{tag}_{i}.log", devices, **kw)
        for i in range(n)
    ]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; kills every process still running after `timeout` s (and fails)."""
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a process was still running after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _log(tmp: Path, tag: str, i: int) -> str:
    return (tmp / f"{tag}_{i}.log").read_text(errors="replace")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _final_state(workdir: Path, stage: str):
    """The latest step and train state of a stage, onto this process's first device (it was saved on 4)."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = ocp.CheckpointManager(workdir / stage / "checkpoints").latest_step()
    path = workdir / stage / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        return step, ckptr.restore(path, target)


def _metric_rows(workdir: Path) -> dict:
    """(stage, step) -> the last metrics row of a training step (a resumed run logs again after its checkpoint)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): r for r in rows if r["stage"] in ("tokenizer", "generator")}


def _max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs)


def test_two_processes_train_resume_and_match_one_process(tmp_path):
    """The whole run on 2 processes x 2 devices, killed once and resumed, equals 1 process x 4 devices."""
    ref = tmp_path / "ref"
    one = _start([*TINY, f"--workdir={ref}"], tmp_path / "ref.log", devices=4)
    work, cache = tmp_path / "multi", tmp_path / "cache"
    first = _start_processes([*TINY, f"--workdir={work}"], tmp_path, "first", cache=cache)
    ckpts = work / "generator" / "checkpoints"
    deadline = time.time() + 420
    while time.time() < deadline and not (ckpts / "2").is_dir() and all(p.poll() is None for p in first):
        time.sleep(0.05)
    assert (ckpts / "2").is_dir(), _log(tmp_path, "first", 0)[-3000:]
    first[1].send_signal(signal.SIGKILL)  # a host dies: the other stops at its heartbeat timeout (10 s)
    t_kill = time.time()
    codes = _wait(first, timeout=120)
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL
    assert time.time() - t_kill < 60, "the surviving process did not stop after its heartbeat timeout"

    again = _start_processes([*TINY, f"--workdir={work}"], tmp_path, "again", cache=cache)
    assert _wait(again, timeout=420) == [0, 0], _log(tmp_path, "again", 0)[-3000:] + _log(tmp_path, "again", 1)[-3000:]
    assert _wait([one], timeout=420) == [0], (tmp_path / "ref.log").read_text()[-3000:]
    for i in (0, 1):
        text = _log(tmp_path, "again", i)
        assert "[generator] resumed from step" in text and "[tokenizer] already trained" in text
        assert "reusing token shards" in text
    for stage in ("tokenizer", "generator"):
        step_a, a = _final_state(ref, stage)
        step_b, b = _final_state(work, stage)
        assert step_a == step_b
        # Same data order, same init; only the cross-process all-reduce (gloo) sums in another order than XLA's
        # in-process one. Measured after 4 + 8 Adam steps: EMA params (the exports) 3.0e-6 / 7.5e-9, generator
        # params 1.5e-8 (values up to 1.4); bound 1e-5.
        assert _max_abs_diff(a["ema_params"], b["ema_params"]) < 1e-5, stage
        if stage == "generator":
            assert _max_abs_diff(a["params"], b["params"]) < 1e-5
    # The tokenizer's raw params: conv biases ahead of a GroupNorm have an exactly zero gradient, so their float
    # gradients are rounding noise, which Adam normalises into steps of up to lr: they differ by up to 1.7e-4
    # (measured). Bound: 4 steps x lr 2e-3 = 8e-3; every other number below is checked at 1e-5.
    tok_ref, tok_multi = _final_state(ref, "tokenizer")[1], _final_state(work, "tokenizer")[1]
    assert _max_abs_diff(tok_ref["params"], tok_multi["params"]) < 8e-3
    ref_rows, rows = _metric_rows(ref), _metric_rows(work)
    assert ref_rows.keys() == rows.keys()
    for key, row in ref_rows.items():  # losses and gradient norms of every logged step, both stages: 3.9e-7
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(rows[key][name], row[name], rtol=1e-5, err_msg=f"{key} {name}")
    # Written once, by process 0: the report, the metrics (one row per logged step and stage), grids, exports.
    report = json.loads((work / "report.json").read_text())
    assert report["device"] == "4 x cpu" and report["generator"]["num_samples"] > 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    first_rows = [(r["stage"], r["step"]) for r in rows if r["stage"] == "tokenizer"]
    assert len(first_rows) == len(set(first_rows)) == 2
    assert (work / "final_samples.png").is_file() and (work / "generator" / "samples").is_dir()
    for stage in ("tokenizer", "generator"):
        assert (work / stage / "export" / "config.json").is_file()


def test_coordinator_that_never_answers_is_a_clear_error(tmp_path):
    """Process 1 of 2 alone: process 0 never starts, so no coordinator answers; one line within the timeout."""
    port = _free_port()
    p = _start(
        [*TINY, f"--workdir={tmp_path / 'w'}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         "--process_id=1", "--initialization_timeout_s=5"],
        tmp_path / "alone.log", devices=2,
    )  # fmt: skip
    t0 = time.time()
    assert _wait([p], timeout=90) == [1]
    text = (tmp_path / "alone.log").read_text()
    assert time.time() - t0 < 60
    (line,) = _errors(text)
    assert f"could not join the run at 127.0.0.1:{port} within 5 s" in line and "Traceback" not in text


def test_processes_with_different_configs_are_refused(tmp_path):
    procs = _start_processes([*TINY, f"--workdir={tmp_path / 'w'}"], tmp_path, "differ", extra={1: ["--config.seed=1"]})
    assert _wait(procs, timeout=120) == [1, 1]
    for i in (0, 1):
        (line,) = _errors(_log(tmp_path, "differ", i))
        assert "processes [1] were started with another config / workdir than process 0" in line
    assert not (tmp_path / "w" / "tokenizer" / "checkpoints").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2", "--process_id=0"], "needs --coordinator_address=HOST:PORT"),
        (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"], r"--process_id=2 must be in"),
        (["--num_processes=2", "--process_id=0", "--coordinator_address=localhost"], "is not HOST:PORT"),
    ],
)
def test_bad_distributed_flags(tmp_path, flags, message):
    p = _start([*TINY, f"--workdir={tmp_path / 'w'}", *flags], tmp_path / "bad.log", devices=1)
    assert _wait([p], timeout=60) == [1]
    (line,) = _errors((tmp_path / "bad.log").read_text())
    assert message.replace("\\", "") in line
