"""experiments/gpu_suite.sh --quick (every step of the GPU suite on tiny models, on the CPU) and the train-step
sweep of experiments/bench_train_step.py (one row per combination, error rows, the time budget)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "experiments" / "gpu_suite.sh"
SETTINGS = ("model", "family", "dtype", "attn_backend", "scan_layers", "remat", "batch")


def _env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark subprocess: the CPU, one host device (conftest's 8 fake devices would split
    the batch 8 ways), this interpreter as `python`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, **extra)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _rows(report: dict) -> list:
    """A report's rows: `results` (timing.write_report) or `rows` (bench_eval, bench_compile), whichever is a list."""
    return next((report[k] for k in ("results", "rows") if isinstance(report.get(k), list)), [])


def _sweep(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "experiments/bench_train_step.py", "--mode=speed", "--repeats=1", f"--out={out}", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_step_sweep_rows_carry_settings(tmp_path):
    """2 combinations that run (unrolled / scanned, remat dots_no_batch) and 2 that fail (cudnn in float32, and off a
    GPU): four rows in sweep order, each with its settings; the failures are error rows and the sweep goes on."""
    report = _sweep(tmp_path, "--models=llamagen_tiny", "--dtype=float32", "--batch=2", "--scan_layers=false,true",
                    "--remat=dots_no_batch", "--attn_backend=xla,cudnn")  # fmt: skip
    rows = report["results"]
    assert report["complete"] and report["skipped"] == [] and report["errors"] == 2
    got = [(r["scan_layers"], r["attn_backend"], r["status"]) for r in rows]
    assert got == [(False, "xla", "ok"), (False, "cudnn", "error"), (True, "xla", "ok"), (True, "cudnn", "error")]
    for r in rows:
        assert {k: r[k] for k in SETTINGS} == {"model": "llamagen_tiny", "family": "llamagen", "dtype": "float32",
                                               "attn_backend": r["attn_backend"], "scan_layers": r["scan_layers"],
                                               "remat": "dots_no_batch", "batch": 2}  # fmt: skip
    for r in rows[0::2]:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["seq_len"] == 16
        assert r["params"] == r["trained_params"] > 0 and r["memory"]["temp_bytes"] >= 0
    for r in rows[1::2]:
        assert "cudnn" in r["error"] and "\n" not in r["error"]


def test_train_step_sweep_budget(tmp_path):
    """A spent --budget_s starts no row: the JSON lists every combination as skipped."""
    report = _sweep(tmp_path, "--models=var_tiny,llamagen_tiny", "--batch=2", "--remat=none,full", "--budget_s=0.001")
    assert report["complete"] and report["results"] == []
    assert [(s["model"], s["remat"]) for s in report["skipped"]] == [
        ("var_tiny", "none"), ("var_tiny", "full"), ("llamagen_tiny", "none"), ("llamagen_tiny", "full")]  # fmt: skip


@pytest.mark.slow
def test_gpu_suite_quick(tmp_path):
    """Every step of the suite (the names of its `step LIMIT NAME` lines) ends with rc=0 and writes NAME.json with rows
    (~8 min on a busy 2-core CPU)."""
    names = re.findall(r"^\s*step \S+ (\w+) ", SUITE.read_text(), flags=re.M)
    expected = list(dict.fromkeys(names))  # each name once (the quick and full branches share the names)
    proc = subprocess.run(["bash", str(SUITE), "--quick"], cwd=REPO, env=_env(OUT=str(tmp_path)), capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "steps.txt").read_text().splitlines()
    assert lines[-1].startswith("done ")
    steps = dict(re.fullmatch(r"(\w+) (rc=\d+ \d+s|skipped .*)", line).groups() for line in lines[:-1])
    assert list(steps) == expected
    for name, status in steps.items():
        log = (tmp_path / f"{name}.log").read_text()[-2000:]
        assert status.startswith("rc=0 "), f"{name}: {status}\n{log}"
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert _rows(report), f"{name}: no rows in its JSON\n{log}"
