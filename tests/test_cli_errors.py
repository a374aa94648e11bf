"""User errors end the binary with one `error:` line (what is wrong, what to do) and a non-zero status; the traceback
only with --verbosity=1. Each case runs `python -m jaxgen.main` as a user would."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from jaxgen import cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/digits_var.py:smoke"
TINY_TOKENIZER = [
    "--config.stages=('tokenizer',)",
    "--config.train_tokenizer.steps=2",
    "--config.train_tokenizer.batch_size=16",
    "--config.train_tokenizer.log_every=1",
    "--config.train_tokenizer.ckpt_every=2",
    "--config.train_tokenizer.sample_every=0",
]


def _env(cache: Path | None = None) -> dict:
    # One CPU device (the fake 8 of conftest only slow the compile down); a shared compilation cache.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    return env


def _main(*args: str, cache: Path | None = None, timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.main", *args],
        cwd=REPO,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stderr


def _error_line(err: str) -> str:
    """The one `error:` line, which ends stderr, with no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert err.rstrip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """A 2-step tokenizer-only run of digits_var:smoke, checkpointed at step 2."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    rc, err = _main(SMOKE, *TINY_TOKENIZER, f"--workdir={workdir}", cache=cache)
    assert rc == 0, err[-3000:]
    assert (workdir / "tokenizer" / "checkpoints" / "2" / "state").is_dir()
    return workdir


def _damage_truncate(step_dir: Path) -> None:
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(1000)


def _damage_garble(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text("{garbage")


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_garble], ids=["truncated", "garbled"])
def test_damaged_checkpoint_names_the_directory_and_what_to_do(trained, tmp_path, cache, damage):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    step_dir = workdir / "tokenizer" / "checkpoints" / "2"
    damage(step_dir)
    rc, err = _main(SMOKE, *TINY_TOKENIZER, f"--workdir={workdir}", cache=cache)
    assert rc == 1
    line = _error_line(err)
    assert line.startswith(f"error: checkpoint {step_dir} is damaged (")
    assert line.endswith("): delete that directory (the stage then starts from step 0) or restore it from a backup")


def test_workdir_of_another_family_is_refused(trained, cache):
    rc, err = _main("--config=configs/digits_llamagen.py:smoke", *TINY_TOKENIZER, f"--workdir={trained}", cache=cache)
    assert rc == 1
    line = _error_line(err)
    assert line.startswith(f"error: {trained / 'tokenizer'} holds a var checkpoint but the config is family 'llamagen'")
    assert "nothing was overwritten: use configs/var_*.py" in line


def test_missing_config_section_is_named(tmp_path):
    config = tmp_path / "no_generator_section.py"
    config.write_text(
        textwrap.dedent(f"""
        from jaxgen.config_util import load_config

        def get_config(arg=""):
            cfg = load_config({str(REPO / "configs/digits_var.py")!r} + ":smoke")
            del cfg["train_generator"]
            return cfg
        """)
    )
    rc, err = _main(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert rc == 1
    assert _error_line(err) == (
        f"error: {config} has no `train_generator` section (stages=('tokenizer', 'generator')): add it to its "
        f"get_config() (see configs/digits_var.py for the fields)"
    )
    assert not (tmp_path / "run").exists()

    rc, err = _main(f"--config={config}", f"--workdir={tmp_path / 'run'}", "--verbosity=1")
    assert rc == 1 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: {config} has no `train_generator` section")


def test_misspelled_override_is_one_line_with_the_suggestion():
    rc, err = _main(SMOKE, "--workdir=/tmp/unused", "--config.train_tokenizr.lr=1")
    assert rc == 2
    assert _error_line(err) == (
        "error: --config has no field 'train_tokenizr' Did you mean \"train_tokenizer\" instead of "
        '"train_tokenizr"? (see --helpshort)'
    )
    rc, err = _main(SMOKE, "--workdir=/tmp/unused", "--config.var.depthh=3")  # a nested field
    assert rc == 2
    assert _error_line(err) == (
        'error: --config has no field \'depthh\' Did you mean "depth" instead of "depthh"? (see --helpshort)'
    )


def test_workdir_inside_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    rc, err = _main(SMOKE, f"--workdir={tmp_path / 'file' / 'run'}")
    assert rc == 1
    assert _error_line(err) == (
        f"error: --workdir={tmp_path / 'file' / 'run'} is inside {tmp_path / 'file'}, which is a file, not a "
        f"directory: choose another --workdir"
    )


def test_read_only_workdir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 directory; the probe is tested in test_read_only_probe_* instead")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = _main(SMOKE, f"--workdir={ro}")
    finally:
        ro.chmod(0o755)
    assert rc == 1
    assert _error_line(err).startswith(f"error: --workdir={ro} is not writable (")


def test_read_only_probe_catches_what_os_access_misses(tmp_path, monkeypatch):
    """A read-only mount as root: os.access says yes, creating the probe file fails (EROFS)."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=r"--workdir=.*/run cannot be created: .* is not writable \(Read-only"):
        cli.check_writable_dir(tmp_path / "run")
    monkeypatch.setattr(cli.os, "access", lambda *a: False)
    with pytest.raises(PermissionError, match=r"is not writable \(no write permission\): .*chmod u\+w"):
        cli.check_writable_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_with_status_130(tmp_path):
    """A real SIGINT in a process that runs its work under `cli.run_user_command` (what both binaries do)."""
    script = tmp_path / "work.py"
    script.write_text(
        textwrap.dedent("""
        import time
        from absl import app
        from jaxgen import cli

        def work():
            print("ready", flush=True)
            time.sleep(120)

        app.run(lambda argv: cli.run_user_command(work), flags_parser=cli.parse_flags)
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _error_line(err) == (
        "error: interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint it wrote"
    )


@pytest.fixture
def keep_hooks(monkeypatch):
    """run_user_command leaves its quiet hooks in place when it exits the process; put them back after the test."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(cli, "_hooks_installed", False)


def test_background_thread_errors_stay_out_of_stderr_once_a_command_fails(keep_hooks):
    """After a failed read of a damaged checkpoint, TensorStore's callback threads print "Event loop is closed"
    tracebacks through sys.excepthook: those go to the debug log; the main thread's still reach the old hook."""
    printed = []
    sys.excepthook = lambda exc_type, exc, tb: printed.append(str(exc))
    cli.run_user_command(lambda: None)
    sys.excepthook(RuntimeError, RuntimeError("after a normal return"), None)
    assert printed == ["after a normal return"]  # hooks restored

    def damaged():
        raise ValueError("checkpoint is damaged")

    with pytest.raises(SystemExit):
        cli.run_user_command(damaged)
    t = threading.Thread(target=lambda: sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None))
    t.start()
    t.join()
    sys.excepthook(RuntimeError, RuntimeError("main thread"), None)
    assert printed == ["after a normal return", "main thread"]


def test_user_errors_keep_their_message_other_errors_their_traceback(capsys, keep_hooks):
    def bad_config():
        raise ValueError("train_generator.batch_size=0 must be positive:\n  set it to e.g. 64")

    with pytest.raises(SystemExit) as e:
        cli.run_user_command(bad_config)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: train_generator.batch_size=0 must be positive: set it to e.g. 64\n"

    class Stop(RuntimeError):
        exit_code = 143

    def stopped():
        raise Stop("stopped")

    with pytest.raises(SystemExit) as e:
        cli.run_user_command(stopped, user_errors=(Stop,))
    assert e.value.code == 143

    def bug():
        raise IndexError("a bug")

    with pytest.raises(IndexError):
        cli.run_user_command(bug)
