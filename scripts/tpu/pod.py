#!/usr/bin/env python3
"""Train jaxgen on a Cloud TPU slice with gcloud: create it, install jaxgen on every worker, run jaxgen.main there.

    python scripts/tpu/pod.py up --name=var-d16 --zone=us-central1-a --accelerator-type=v5litepod-16 \\
        --runtime-version=v2-alpha-tpuv5-lite --spot --config=configs/var_imagenet.py:d16 \\
        --workdir=gs://BUCKET/runs/var_d16 --data-dir=gs://BUCKET/tensorflow_datasets \\
        -- --config.tokenizer_checkpoint=~/ckpt/var_d16
    python scripts/tpu/pod.py up ... --dry-run     # print every command, run none (gcloud need not be installed)
    python scripts/tpu/pod.py delete --name=var-d16 --zone=us-central1-a

Subcommands: create, wait, install, train, up, status, logs, stop, delete. They all take the same flags (each reads
the ones it needs), so one command line serves them all; the arguments after `--` go to jaxgen.main unchanged.
`up` = create if absent + wait until ACTIVE / READY + install + train, and it is idempotent: rerun after a preemption,
it recreates the slice and jaxgen.main resumes from the last checkpoint in the gs:// workdir.

Training runs under nohup on every worker (a dropped ssh connection does not stop it), logging to
~/jaxgen_train.log; `train` and `up` follow that log until jaxgen.main ends and exit with its status (0 finished,
143 stopped; non-zero too when the slice goes away), `--detach` returns at once. Standard library only.
Walk-through: docs/tpu_pods.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout this script belongs to: the default --source

SUBCOMMANDS = {
    "create": "request the slice: a queued resource (default) or, with --tpu-vm, a TPU VM",
    "wait": "poll until the slice is ACTIVE (queued resource) / READY (TPU VM)",
    "install": "copy (or git fetch) jaxgen onto every worker and pip install it with the [tpu] extra",
    "train": "start the same jaxgen.main on every worker and follow its log until it ends",
    "up": "create if absent or preempted, wait, install, train",
    "status": "describe the slice",
    "logs": "follow the training log of one worker (--worker, default 0)",
    "stop": "SIGTERM to jaxgen.main on every worker: it checkpoints at the next step and exits",
    "delete": "delete the slice (a queued resource with its nodes)",
}
NEEDS = {  # flags a subcommand cannot do without (beyond --name and --zone)
    "create": ("accelerator_type", "runtime_version"),
    "up": ("accelerator_type", "runtime_version", "config", "workdir"),
    "train": ("accelerator_type", "config", "workdir"),
}

# Queued resource and TPU VM states: the one that means usable, and those whose nodes are gone for good (preempted,
# or never provisioned), which `up` deletes to create afresh.
QR_READY, QR_GONE = "ACTIVE", ("SUSPENDING", "SUSPENDED", "FAILED")
VM_READY, VM_GONE = "READY", ("PREEMPTED", "TERMINATED", "STOPPED")

# On the workers (the home directory of the ssh user).
LOG = "~/jaxgen_train.log"
PIDFILE = "~/jaxgen_train.pid"
TARBALL = "jaxgen-src.tar.gz"
# Installed beside jaxgen[tpu]: without TensorFlow, gs:// paths in tfds and Orbax (etils.epath) go through fsspec,
# which needs gcsfs for Cloud Storage.
PIP_EXTRAS = ("gcsfs",)
# Left out of the tarball of a local --source.
PACK_EXCLUDES = ("./.git", "./.venv", "./workdir", "./out", "./build")
PACK_EXCLUDES_ANYWHERE = ("__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints")


class UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class PodError(Exception):
    """A step that failed: one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


# ---- the command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pod.py",
        description=__doc__.split("\n\n")[0],
        epilog="subcommands:\n" + "\n".join(f"  {k:8} {v}" for k, v in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("command", metavar="SUBCOMMAND", choices=SUBCOMMANDS, help=", ".join(SUBCOMMANDS))
    g = p.add_argument_group("the slice")
    g.add_argument("--name", required=True, help="queued resource and TPU node id, e.g. var-d16")
    g.add_argument("--zone", required=True, help="e.g. us-central1-a")
    g.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    g.add_argument("--accelerator-type", help="e.g. v5litepod-16, v6e-16, v4-32, v5p-16 (create, up, train)")
    g.add_argument("--runtime-version", help="TPU software version, e.g. v2-alpha-tpuv5-lite (create, up)")
    g.add_argument("--tpu-vm", action="store_true", help="a plain TPU VM (tpu-vm create) instead of a queued resource")
    tier = g.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible")
    tier.add_argument("--reserved", action="store_true", help="capacity from the project's reservation")
    g.add_argument(
        "--create-flag", action="append", default=[], metavar="FLAG", help="extra flag for the create command, "
        "in the = form: --create-flag=--network=NET (repeatable)"
    )  # fmt: skip
    g = p.add_argument_group("installing jaxgen on the workers")
    g.add_argument(
        "--source", default=str(REPO), help="a local jaxgen checkout, packed and copied to every worker (default: "
        "this one), or a git URL fetched on every worker (https://..., git@..., git+https://...)"
    )  # fmt: skip
    g.add_argument("--ref", help="branch, tag or commit of a git --source (default: its default branch)")
    g.add_argument("--remote-dir", default="~/jaxgen", help="where jaxgen lives on the workers (default ~/jaxgen)")
    g.add_argument("--python", default="python3", help="the workers' Python (default python3)")
    g.add_argument(
        "--setup", action="append", default=[], metavar="CMD", help="a shell command run on every worker after the "
        "install, e.g. 'gcloud storage cp -r gs://BUCKET/ckpt/var_d16 ~/ckpt/' (repeatable)"
    )  # fmt: skip
    g = p.add_argument_group("training")
    g.add_argument("--config", help="configs/NAME.py[:variant], relative to the jaxgen checkout")
    g.add_argument("--workdir", help="gs://BUCKET/PATH: checkpoints and metrics, shared by all workers")
    g.add_argument("--data-dir", help="tfds data_dir, e.g. gs://BUCKET/tensorflow_datasets")
    g.add_argument("--detach", action="store_true", help="train: return once jaxgen.main is started")
    g.add_argument(
        "--restarts", type=int, default=0, help="up: after a preemption, recreate and resume up to this many times "
        "(default 0: rerun up yourself)"
    )  # fmt: skip
    g.add_argument("--worker", default="0", help="logs: which worker's log (default 0)")
    g = p.add_argument_group("waiting")
    g.add_argument("--poll-seconds", type=float, default=30.0, help="between state checks (default 30)")
    g.add_argument("--wait-timeout", type=float, default=0.0, help="give up waiting after this many s (0: never)")
    p.add_argument("--dry-run", action="store_true", help="print every command, one per line, and run none")
    return p


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """pod.py's own arguments, and those after the first `--` (for jaxgen.main)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def multi_host(accelerator_type: str) -> bool:
    """Whether a slice spans several TPU VMs: the type's number (chips for v5e / v6e, TensorCores for v2-v4 and
    v5p) above 8, which is one host's worth in every generation."""
    m = re.fullmatch(r"[a-z][a-z0-9]*-(\d+)", accelerator_type)
    if not m:
        raise UsageError(
            f"--accelerator-type={accelerator_type!r} is not a TPU type: e.g. v5litepod-16, v6e-16, v4-32, v5p-16"
        )
    return int(m.group(1)) > 8


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and check the command line; every problem is one UsageError line, raised before anything runs."""
    own, passthrough = split_passthrough(argv)
    o = build_parser().parse_args(own)
    o.passthrough = passthrough
    o.notes = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", o.name):
        raise UsageError(f"--name={o.name!r}: lowercase letters, digits and hyphens, starting with a letter (<= 63)")
    if not re.fullmatch(r"[a-z]+(-[a-z]+)*\d+-[a-z]", o.zone):
        raise UsageError(f"--zone={o.zone!r} is not a zone: e.g. us-central1-a, europe-west4-b")
    for field in NEEDS.get(o.command, ()):
        if not getattr(o, field):
            raise UsageError(f"{o.command} needs --{field.replace('_', '-')}")
    o.multi_host = multi_host(o.accelerator_type) if o.accelerator_type else True
    _check_source(o)
    if o.command in ("train", "up"):
        _check_training(o)
    if o.restarts < 0 or o.poll_seconds < 0 or o.wait_timeout < 0:
        raise UsageError("--restarts, --poll-seconds and --wait-timeout must be >= 0")
    if o.detach and o.restarts:
        raise UsageError("--restarts needs training to be followed to its end: drop --detach")
    if o.worker != "all" and not o.worker.isdigit():
        raise UsageError(f"--worker={o.worker!r}: a worker number (0, 1, ...) or all")
    if not o.remote_dir.strip():
        raise UsageError("--remote-dir is empty")
    return o


def _check_source(o: argparse.Namespace) -> None:
    s = o.source
    o.git_url = s.removeprefix("git+") if "://" in s or s.startswith("git@") else None
    if o.git_url:
        o.ref = o.ref or "HEAD"
        o.source_dir = None
        return
    if o.ref:
        raise UsageError(f"--ref={o.ref} needs a git --source (a URL), not the directory {s}")
    o.source_dir = Path(s).expanduser().resolve()
    if not (o.source_dir / "pyproject.toml").is_file():
        raise UsageError(f"--source={s} is not a jaxgen checkout (no pyproject.toml there)")


def _check_training(o: argparse.Namespace) -> None:
    config_file = o.config.split(":", 1)[0]
    if o.source_dir is not None and not (o.source_dir / config_file).is_file():
        raise UsageError(f"--config={o.config}: {config_file} is not in --source={o.source_dir}")
    for flag, value, why in (
        ("--workdir", o.workdir, "every worker writes and reads the same checkpoints"),
        ("--data-dir", o.data_dir, "every worker reads its share of the same dataset"),
    ):
        if value is None:
            continue
        if value.startswith("gs://"):
            if not value[len("gs://") :].split("/", 1)[0]:
                raise UsageError(f"{flag}={value} has no bucket: gs://BUCKET/PATH")
        elif o.multi_host:
            raise UsageError(f"{flag}={value} must be a gs:// path on a multi-host slice ({o.accelerator_type}): {why}")
        elif flag == "--workdir":
            o.notes.append(f"--workdir={value} is on the TPU VM's disk: it goes with the VM (preemption, delete)")
    for a in o.passthrough:
        key = a.split("=", 1)[0]
        if key == "--dry-run":  # jaxgen.main has no such flag; the run would be real
            raise UsageError("--dry-run after --: that is jaxgen.main's part of the line; put it before --")
        if not a.startswith("--"):
            raise UsageError(f"{a!r} after --: jaxgen.main takes --flag=value arguments")
        if key in ("--config", "--workdir"):
            raise UsageError(f"{key} after --: give it to pod.py ({key}=...), which checks it")


# ---- the commands: each builder returns one argv ---------------------------------------------------------------------


def remote_path(path: str) -> str:
    """A path for the workers' shell, quoted but with a leading ~/ left to expand there."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def _where(o) -> list[str]:
    return [f"--zone={o.zone}"] + ([f"--project={o.project}"] if o.project else [])


def _tier(o) -> list[str]:
    return ["--spot"] if o.spot else ["--reserved"] if o.reserved else []


def _tpus(o, group: str, verb: str, *args: str) -> list[str]:
    """`gcloud compute tpus GROUP VERB NAME --zone=... [--project=...] ARGS...`"""
    return ["gcloud", "compute", "tpus", group, verb, o.name, *_where(o), *args]


def create_queued_resource_cmd(o) -> list[str]:
    return _tpus(
        o,
        "queued-resources",
        "create",
        f"--node-id={o.name}",  # the TPU VM gets the queued resource's name: tpu-vm ssh / scp find it by that
        f"--accelerator-type={o.accelerator_type}",
        f"--runtime-version={o.runtime_version}",
        *_tier(o),
        *o.create_flag,
    )


def create_tpu_vm_cmd(o) -> list[str]:
    return _tpus(
        o,
        "tpu-vm",
        "create",
        f"--accelerator-type={o.accelerator_type}",
        f"--version={o.runtime_version}",
        *_tier(o),
        *o.create_flag,
    )


def create_cmd(o) -> list[str]:
    return create_tpu_vm_cmd(o) if o.tpu_vm else create_queued_resource_cmd(o)


def state_cmd(o) -> list[str]:
    """Prints the state alone: ACTIVE, WAITING_FOR_RESOURCES, ... (queued resource) / READY, ... (TPU VM)."""
    if o.tpu_vm:
        return _tpus(o, "tpu-vm", "describe", "--format=value(state)")
    return _tpus(o, "queued-resources", "describe", "--format=value(state.state)")


def describe_cmd(o) -> list[str]:
    return _tpus(o, "tpu-vm" if o.tpu_vm else "queued-resources", "describe")


def delete_cmd(o) -> list[str]:
    if o.tpu_vm:
        return _tpus(o, "tpu-vm", "delete", "--quiet")
    # --force: the queued resource's nodes too; --quiet: no prompt. Synchronous, so a create can follow.
    return _tpus(o, "queued-resources", "delete", "--force", "--quiet")


def ssh_cmd(o, command: str, worker: str = "all") -> list[str]:
    return _tpus(o, "tpu-vm", "ssh", f"--worker={worker}", f"--command={command}")


def local_tarball(o) -> Path:
    return Path(tempfile.gettempdir()) / f"jaxgen-src-{o.name}.tar.gz"


def pack_cmd(o) -> list[str]:
    excludes = [f"--exclude={p}" for p in (*PACK_EXCLUDES, *PACK_EXCLUDES_ANYWHERE)]
    return ["tar", "-czf", str(local_tarball(o)), *excludes, "-C", str(o.source_dir), "."]


def scp_cmd(o) -> list[str]:
    """The tarball of pack_cmd into every worker's home directory."""
    tpu_vm_scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    return [*tpu_vm_scp, str(local_tarball(o)), f"{o.name}:{TARBALL}", *_where(o), "--worker=all"]


# ---- what runs on the workers: one shell line each -------------------------------------------------------------------


def install_script(o) -> str:
    d = remote_path(o.remote_dir)
    steps = [f"mkdir -p {d}"]
    if o.git_url:  # init + fetch + checkout: idempotent, and takes a branch, a tag or a commit
        url, ref = shlex.quote(o.git_url), shlex.quote(o.ref)
        steps += [f"cd {d}", "git init -q", f"git fetch -q --depth=1 {url} {ref}", "git checkout -q --force FETCH_HEAD"]
    else:
        steps += [f"tar -xzf ~/{TARBALL} -C {d}", f"cd {d}"]
    steps.append(f"{remote_path(o.python)} -m pip install -q -e {shlex.quote('.[tpu]')} {' '.join(PIP_EXTRAS)}")
    return " && ".join(steps + o.setup)


def jaxgen_main_args(o) -> list[str]:
    data = [f"--config.data.source.data_dir={o.data_dir}"] if o.data_dir else []
    return ["-m", "jaxgen.main", f"--config={o.config}", f"--workdir={o.workdir}", *data, *o.passthrough]


def _running_guard() -> str:
    return (
        f'if [ -f {PIDFILE} ] && kill -0 "$(cat {PIDFILE})" 2>/dev/null; then echo "$(hostname): jaxgen.main is '
        f'already running (pid $(cat {PIDFILE})): pod.py logs follows it, pod.py stop stops it" >&2; exit 1; fi'
    )


def train_script(o) -> str:
    """cd; refuse if a jaxgen.main of ours still runs; start it under nohup (a dropped ssh connection leaves it
    running) with its pid in PIDFILE; then follow LOG until it ends and exit with its status, or (--detach) return."""
    main = f"{remote_path(o.python)} {shlex.join(jaxgen_main_args(o))}"
    launch = f"nohup {main} >> {LOG} 2>&1 < /dev/null & echo $! > {PIDFILE}"  # `& ;` would be a syntax error
    steps = [f"cd {remote_path(o.remote_dir)} || exit 1", _running_guard(), f": > {LOG}", launch]
    if o.detach:
        steps.append(f'echo "$(hostname): jaxgen.main started, pid $!, log {LOG}"')
    else:
        steps += [f"tail -n +1 -f --pid=$! {LOG}", "wait $!"]
    return "; ".join(steps)


def stop_script() -> str:
    return (
        f'if [ -f {PIDFILE} ] && kill -0 "$(cat {PIDFILE})" 2>/dev/null; then kill -TERM "$(cat {PIDFILE})" && echo '
        f'"$(hostname): SIGTERM sent, jaxgen.main checkpoints at the next step and exits"; else echo "$(hostname): '
        f'no jaxgen.main running"; fi'
    )


def logs_script() -> str:
    return f"tail -n 100 -F {LOG}"


# ---- running them ----------------------------------------------------------------------------------------------------


class Runner:
    """Prints each command shell-quoted; runs it unless this is a dry run. Dry run: stdout holds only the commands
    and `# ...` lines saying what happens between them."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, text: str) -> None:
        if self.dry_run:
            print(f"# {text}", flush=True)
        else:
            print(f"pod.py: {text}", file=sys.stderr, flush=True)

    def run(self, argv: list[str], check: bool = True) -> int:
        line = shlex.join(argv)
        if self.dry_run:
            print(line, flush=True)
            return 0
        print(f"+ {line}", file=sys.stderr, flush=True)
        rc = subprocess.run(argv).returncode
        if check and rc != 0:
            raise PodError(f"exit status {rc} from: {line}")
        return rc

    def query(self, argv: list[str]) -> subprocess.CompletedProcess | None:
        """Run and capture (not echoed: polling would flood the terminal). Dry run: print it, return None."""
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return None
        return subprocess.run(argv, capture_output=True, text=True)


def ready_state(o) -> str:
    return VM_READY if o.tpu_vm else QR_READY


def gone_states(o) -> tuple[str, ...]:
    return VM_GONE if o.tpu_vm else QR_GONE


def query_state(o, r: Runner) -> str | None:
    """The slice's state; None when it does not exist (or in a dry run, which queries nothing)."""
    argv = state_cmd(o)
    result = r.query(argv)
    if result is None:
        return None
    if result.returncode == 0:
        return result.stdout.strip().upper() or "UNKNOWN"
    err = result.stderr.strip()
    if "NOT_FOUND" in err or "not found" in err.lower():
        return None
    last = err.splitlines()[-1] if err else f"exit status {result.returncode}"
    raise PodError(f"{shlex.join(argv)}: {last}")


def wait_ready(o, r: Runner) -> None:
    ready = ready_state(o)
    if r.dry_run:
        r.note(f"wait: repeat every {o.poll_seconds:g} s until the state is {ready}")
        query_state(o, r)
        return
    deadline = time.monotonic() + o.wait_timeout if o.wait_timeout else None
    last = None
    while (state := query_state(o, r)) != ready:
        if state is None or state in gone_states(o):
            raise PodError(f"{o.name} is {state or 'gone'} while waiting for {ready}: rerun up to recreate it")
        if state != last:
            r.note(f"{o.name} is {state}, waiting for {ready}")
            last = state
        if deadline is not None and time.monotonic() >= deadline:
            raise PodError(f"{o.name} is still {state} after --wait-timeout={o.wait_timeout:g} s")
        time.sleep(o.poll_seconds)
    r.note(f"{o.name} is {ready}")


def ensure_slice(o, r: Runner) -> None:
    """Create the slice unless it exists; a preempted or failed one is deleted first. Then wait until usable."""
    state = query_state(o, r)
    if r.dry_run:
        r.note(f"dry run: the state is not queried; assuming {o.name} does not exist")
    while state == "DELETING":
        r.note(f"{o.name} is being deleted; waiting to create it again")
        time.sleep(o.poll_seconds)
        state = query_state(o, r)
    if state in gone_states(o):
        r.note(f"{o.name} is {state} (preempted or never provisioned): deleting it to create it again")
        r.run(delete_cmd(o))
        state = None
    if state is None:
        r.run(create_cmd(o))
    wait_ready(o, r)


def cmd_create(o, r: Runner) -> int:
    return r.run(create_cmd(o))


def cmd_wait(o, r: Runner) -> int:
    wait_ready(o, r)
    return 0


def cmd_install(o, r: Runner) -> int:
    if o.git_url is None:
        r.run(pack_cmd(o))
        r.run(scp_cmd(o))
    return r.run(ssh_cmd(o, install_script(o)))


def cmd_train(o, r: Runner) -> int:
    return r.run(ssh_cmd(o, train_script(o)), check=False)


def cmd_up(o, r: Runner) -> int:
    for attempt in range(o.restarts + 1):
        if attempt:
            r.note(f"restart {attempt} of --restarts={o.restarts}")
        ensure_slice(o, r)
        cmd_install(o, r)
        rc = cmd_train(o, r)
        if r.dry_run:
            if o.restarts:
                r.note(f"if training ends and {o.name} was preempted: all again from the first describe")
            return rc
        if rc == 0 or o.detach:
            return rc
        state = query_state(o, r)
        if state == ready_state(o):  # the state may lag a preemption by a little: look once more
            time.sleep(o.poll_seconds)
            state = query_state(o, r)
        if state == ready_state(o):
            r.note(f"jaxgen.main ended with exit status {rc} on a {state} slice: not a preemption (see pod.py logs)")
            return rc
        r.note(f"jaxgen.main ended with exit status {rc} and {o.name} is {state or 'gone'}: preempted")
    return rc


def cmd_status(o, r: Runner) -> int:
    return r.run(describe_cmd(o), check=False)


def cmd_logs(o, r: Runner) -> int:
    return r.run(ssh_cmd(o, logs_script(), worker=o.worker), check=False)


def cmd_stop(o, r: Runner) -> int:
    return r.run(ssh_cmd(o, stop_script()), check=False)


def cmd_delete(o, r: Runner) -> int:
    return r.run(delete_cmd(o), check=False)


COMMANDS = {
    "create": cmd_create,
    "wait": cmd_wait,
    "install": cmd_install,
    "train": cmd_train,
    "up": cmd_up,
    "status": cmd_status,
    "logs": cmd_logs,
    "stop": cmd_stop,
    "delete": cmd_delete,
}


def main(argv: list[str] | None = None) -> int:
    try:
        o = parse(sys.argv[1:] if argv is None else list(argv))
        if not o.dry_run and shutil.which("gcloud") is None:
            raise PodError("gcloud is not on PATH: install the Google Cloud CLI, or add --dry-run to see the commands")
        r = Runner(o.dry_run)
        for note in o.notes:
            r.note(note)
        return COMMANDS[o.command](o, r)
    except UsageError as e:
        print(f"pod.py: error: {e}", file=sys.stderr)
        return 2
    except PodError as e:
        print(f"pod.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pod.py: interrupted (a jaxgen.main already started keeps running: pod.py stop)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
