"""scripts/tpu/pod.py: the gcloud commands its --dry-run prints (no gcloud, no network), its one-line input errors,
and real runs against a fake gcloud that plays the slice and runs each worker's shell command here with bash."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tpu" / "pod.py"
SLICE = ["--name=var-d16", "--zone=us-central1-a"]
POD = [*SLICE, "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"]
CONFIG = "configs/var_imagenet.py:d16"
TRAIN = [f"--config={CONFIG}", "--workdir=gs://bkt/runs/var_d16", "--data-dir=gs://bkt/tensorflow_datasets"]
TPUS = ["gcloud", "compute", "tpus"]


def pod(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # No gcloud on PATH: a dry run must not need it.
    env = {"PATH": "/nonexistent", "TMPDIR": "/tmp"} if env is None else env
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def dry(*args: str) -> list[list[str]]:
    """The commands a dry run prints, each split as the shell would; checks they are one per line, exactly quoted."""
    result = pod("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    commands = []
    for line in result.stdout.splitlines():
        if line.startswith("# "):
            continue
        argv = shlex.split(line)
        assert shlex.join(argv) == line  # printed exactly as it would run
        commands.append(argv)
    return commands


def remote(argv: list[str]) -> str:
    """The shell line an `ssh --command=...` runs on the workers."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


def kind(argv: list[str]) -> str:
    if argv[0] == "tar":
        return "pack"
    if argv[4] == "ssh":
        return "train" if "jaxgen.main" in remote(argv) else "install"
    return argv[4]


def main_argv(train_command: str) -> list[str]:
    """The jaxgen.main command line inside the workers' training shell line."""
    return shlex.split(train_command.split("nohup ", 1)[1].split(" >> ", 1)[0])


def test_create_queued_resource_spot():
    (argv,) = dry("create", *POD, "--spot", "--project=my-proj")
    assert argv[:6] == [*TPUS, "queued-resources", "create", "var-d16"]
    assert set(argv[6:]) == {
        "--node-id=var-d16",
        "--zone=us-central1-a",
        "--project=my-proj",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    }


def test_create_tpu_vm_reserved_with_extra_flags():
    (argv,) = dry("create", *POD, "--tpu-vm", "--reserved", "--create-flag=--network=my-net")
    assert argv[:6] == [*TPUS, "tpu-vm", "create", "var-d16"]
    assert "--version=v2-alpha-tpuv5-lite" in argv and "--reserved" in argv and "--network=my-net" in argv
    assert "--spot" not in argv and not any(a.startswith("--runtime-version") for a in argv)


def test_train_runs_the_same_main_on_every_worker():
    overrides = ["--config.tokenizer_checkpoint=~/ckpt/var_d16", "--config.train_generator.lr=1e-4 ", "--verbosity=1"]
    (argv,) = dry("train", *POD, *TRAIN, "--", *overrides)
    assert argv[:6] == [*TPUS, "tpu-vm", "ssh", "var-d16"]
    assert "--worker=all" in argv and "--zone=us-central1-a" in argv
    command = remote(argv)
    assert command.startswith("cd ~/jaxgen || exit 1; ")
    assert main_argv(command) == [
        "python3",
        "-m",
        "jaxgen.main",
        f"--config={CONFIG}",
        "--workdir=gs://bkt/runs/var_d16",
        "--config.data.source.data_dir=gs://bkt/tensorflow_datasets",
        *overrides,  # unchanged, a trailing space included
    ]
    assert command.endswith("wait $!")  # follows the run and exits with its status
    (detached,) = dry("train", *POD, *TRAIN, "--detach")
    assert "wait $!" not in remote(detached) and "nohup " in remote(detached)


def test_up_creates_waits_installs_trains_in_order():
    commands = dry("up", *POD, *TRAIN, "--spot")
    assert [kind(c) for c in commands] == ["describe", "create", "describe", "pack", "scp", "install", "train"]
    describe, create, wait, pack, scp, install, train = commands
    state = [*TPUS, "queued-resources", "describe", "var-d16", "--zone=us-central1-a", "--format=value(state.state)"]
    assert describe == wait == state
    assert create[3:5] == ["queued-resources", "create"] and "--spot" in create
    assert pack[-3:] == ["-C", str(REPO), "."] and "--exclude=./.venv" in pack
    assert scp[-3:] == ["var-d16:jaxgen-src.tar.gz", "--zone=us-central1-a", "--worker=all"] and scp[5] == pack[2]
    assert "--worker=all" in install and "pip install -q -e '.[tpu]' gcsfs" in remote(install)
    assert main_argv(remote(train))[2:5] == ["jaxgen.main", f"--config={CONFIG}", "--workdir=gs://bkt/runs/var_d16"]


def test_up_from_git_fetches_on_the_workers():
    url = "https://github.com/example/jaxgen.git"
    commands = dry("up", *POD, *TRAIN, "--tpu-vm", f"--source=git+{url}", "--ref=v0.1.0")
    assert [kind(c) for c in commands] == ["describe", "create", "describe", "install", "train"]
    assert commands[0][-1] == "--format=value(state)" and commands[1][3:5] == ["tpu-vm", "create"]
    assert f"git fetch -q --depth=1 {url} v0.1.0 && git checkout -q --force FETCH_HEAD" in remote(commands[3])


def test_single_host_may_keep_a_local_workdir():
    one_host = [*SLICE, "--accelerator-type=v5litepod-8", f"--config={CONFIG}"]
    result = pod("--dry-run", "train", *one_host, "--workdir=/tmp/w")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# --workdir=/tmp/w is on the TPU VM's disk")


def test_delete_status_logs_stop():
    assert dry("delete", *SLICE) == [[*TPUS, "queued-resources", "delete", "var-d16", *SLICE[1:], "--force", "--quiet"]]
    assert dry("delete", *SLICE, "--tpu-vm") == [[*TPUS, "tpu-vm", "delete", "var-d16", *SLICE[1:], "--quiet"]]
    assert dry("status", *SLICE) == [[*TPUS, "queued-resources", "describe", "var-d16", *SLICE[1:]]]
    (logs,) = dry("logs", *SLICE, "--worker=1")
    assert "--worker=1" in logs and remote(logs) == "tail -n 100 -F ~/jaxgen_train.log"
    (stop,) = dry("stop", *SLICE)
    assert "--worker=all" in stop and 'kill -TERM "$(cat ~/jaxgen_train.pid)"' in remote(stop)


@pytest.mark.parametrize(
    "args, words",
    [
        (["frobnicate", *SLICE], "invalid choice: 'frobnicate'"),
        (["up", "--zone=us-central1-a"], "--name"),
        (["up", *SLICE, *TRAIN], "up needs --accelerator-type"),
        (["train", *POD, "--workdir=/data/runs/a", f"--config={CONFIG}"], "must be a gs:// path on a multi-host"),
        (["train", *POD[:3], "--accelerator-type=v4-32", *TRAIN[:2], "--data-dir=/data/tfds"], "--data-dir=/data/tfds"),
        (["train", *POD, f"--config={CONFIG}", "--workdir=gs://"], "has no bucket"),
        (["create", *POD, "--spot", "--reserved"], "not allowed with argument --spot"),
        (["create", *SLICE, "--accelerator-type=v5e", "--runtime-version=r"], "is not a TPU type"),
        (["create", "--name=Var_D16", "--zone=us-central1-a"], "--name='Var_D16'"),
        (["train", *POD, *TRAIN, "--", "--workdir=gs://bkt/other"], "give it to pod.py"),
        (["up", *POD, *TRAIN, "--", "--dry-run"], "put it before --"),
        (["train", *POD, *TRAIN[1:], "--config=configs/nope.py"], "configs/nope.py is not in --source"),
        (["install", *SLICE, "--ref=main"], "--ref=main needs a git --source"),
    ],
)
def test_bad_input_is_one_line_and_runs_nothing(args, words):
    result = pod("--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("pod.py: error: ")
    assert words in result.stderr


def test_a_real_run_needs_gcloud():
    result = pod("status", *SLICE)
    assert result.returncode == 1 and "gcloud is not on PATH" in result.stderr
    assert len(result.stderr.splitlines()) == 1


# ---- real runs against a fake gcloud -------------------------------------------------------------------------------

FAKE_GCLOUD = """#!{python}
# gcloud's stand-in: the slice's state in $FAKE/state, "GROUP VERB" of each call in $FAKE/calls; ssh runs the
# worker's command here with bash, HOME=$FAKE/worker (one worker), and scp copies into that home.
import os, shutil, subprocess, sys
from pathlib import Path
fake = Path(os.environ["FAKE"])
args = sys.argv[1:]
group, verb = args[2], args[3]
with open(fake / "calls", "a") as f:
    f.write(f"{{group}} {{verb}}\\n")
state = fake / "state"
if verb == "describe":
    if not state.exists():
        sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND: the resource was not found")
    print(state.read_text())
elif verb == "create":
    state.write_text("ACTIVE")
elif verb == "delete":
    state.unlink()
elif verb == "scp":
    shutil.copy(args[4], fake / "worker" / args[5].split(":", 1)[1])
elif verb == "ssh":
    (command,) = [a[len("--command="):] for a in args if a.startswith("--command=")]
    sys.exit(subprocess.run(["bash", "-c", command], env=dict(os.environ, HOME=str(fake / "worker"))).returncode)
"""

FAKE_PYTHON = """#!{python}
# The workers' python: records its arguments; jaxgen.main exits with the next status in $FAKE/exits, and a 143
# also suspends the queued resource, as a Spot preemption does.
import json, os, sys
from pathlib import Path
fake = Path(os.environ["FAKE"])
with open(fake / "python_calls", "a") as f:
    f.write(json.dumps([os.getcwd(), *sys.argv[1:]]) + "\\n")
if sys.argv[1:3] == ["-m", "jaxgen.main"]:
    code, *rest = (fake / "exits").read_text().split()
    (fake / "exits").write_text(" ".join(rest))
    print("training step 1", flush=True)
    if code == "143":
        (fake / "state").write_text("SUSPENDED")
    sys.exit(int(code))
"""


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """$FAKE: bin/gcloud, a worker's home, its python, and a tiny jaxgen checkout as the --source."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "worker").mkdir()
    for path, text in ((tmp_path / "bin" / "gcloud", FAKE_GCLOUD), (tmp_path / "python", FAKE_PYTHON)):
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'jaxgen'\n")
    (src / "configs" / "tiny.py").write_text("# a config\n")
    return tmp_path


def fake_env(fake: Path) -> dict:
    return dict(os.environ, FAKE=str(fake), PATH=f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(fake))


def fake_args(fake: Path) -> list[str]:
    return [
        *POD,
        "--spot",
        f"--source={fake / 'src'}",
        f"--python={fake / 'python'}",
        "--config=configs/tiny.py",
        "--workdir=gs://bkt/runs/tiny",
        "--poll-seconds=0",
    ]


def test_up_recreates_a_preempted_slice_and_resumes(fake: Path):
    (fake / "exits").write_text("143 0")  # preempted once, then trains to the end
    result = pod("up", *fake_args(fake), "--restarts=1", "--", "--config.seed=3", env=fake_env(fake))
    assert result.returncode == 0, result.stderr
    calls = (fake / "calls").read_text().splitlines()
    once = ["queued-resources create", "queued-resources describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
    assert calls == [
        "queued-resources describe",  # absent
        *once,  # create, wait (ACTIVE), copy, install, train: 143 and the slice is SUSPENDED
        "queued-resources describe",  # SUSPENDED: preempted
        "queued-resources describe",  # up again: still SUSPENDED, so delete and create
        "queued-resources delete",
        *once,  # the second run trains to the end
    ]
    worker = fake / "worker"
    runs = [json.loads(line) for line in (fake / "python_calls").read_text().splitlines()]
    install = [str(worker / "jaxgen"), "-m", "pip", "install", "-q", "-e", ".[tpu]", "gcsfs"]
    train = [str(worker / "jaxgen"), "-m", "jaxgen.main", "--config=configs/tiny.py", "--workdir=gs://bkt/runs/tiny"]
    assert runs == [install, [*train, "--config.seed=3"]] * 2
    assert (worker / "jaxgen" / "configs" / "tiny.py").is_file()  # the checkout, unpacked on the worker
    assert (worker / "jaxgen_train.log").read_text() == "training step 1\n"
    assert "training step 1" in result.stdout  # followed from the log
    assert "preempted" in result.stderr


def test_train_exits_with_the_runs_status_and_refuses_a_second_run(fake: Path):
    (fake / "exits").write_text("143")
    (fake / "worker" / "jaxgen").mkdir()  # as `install` leaves it
    assert pod("train", *fake_args(fake), env=fake_env(fake)).returncode == 143
    alive = subprocess.Popen(["sleep", "30"])  # stands for a jaxgen.main still running on the worker
    try:
        (fake / "worker" / "jaxgen_train.pid").write_text(f"{alive.pid}\n")
        second = pod("train", *fake_args(fake), env=fake_env(fake))
        assert second.returncode == 1 and "jaxgen.main is already running" in second.stderr
        stop = pod("stop", *SLICE, env=fake_env(fake))
        assert stop.returncode == 0 and "SIGTERM sent" in stop.stdout
        assert alive.wait(timeout=10) == -15
    finally:
        if alive.poll() is None:
            alive.kill()
