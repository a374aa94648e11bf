"""Several processes, one run: `jax.distributed` start-up, the same-config check, and the persistent compile cache.

    initialize_distributed()                      # a TPU pod, SLURM, Open MPI: settings from the environment
    initialize_distributed(DistributedSettings(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1))
    check_same_run({"config": config.to_json(), "workdir": "/runs/a"})   # every process started alike, else error
    enable_compile_cache("~/.cache/jaxgen/xla")  # a second process start reuses the compiled executables

Call `initialize_distributed` first thing in a binary, before anything touches a device. On CPU it selects gloo
collectives (the only cross-process CPU implementation). Failures are one-line `DistributedError`s: a coordinator
that never answers ends after `initialization_timeout_s`, not in a hang.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Environment variables by which jax.distributed's cluster auto-detection recognises a launcher, and the variable that
# holds the launch's process count (None: the variables' presence means several processes).
_CLUSTER_ENV: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("JAX_COORDINATOR_ADDRESS",), None),  # a manual launch; num_processes / process_id passed or auto-detected
    (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"), "SLURM_NTASKS"),
    (("OMPI_MCA_orte_hnp_uri",), "OMPI_COMM_WORLD_SIZE"),  # Open MPI's mpirun
    (("MEGASCALE_COORDINATOR_ADDRESS",), None),  # multi-slice TPU
)
_TPU_HOSTS_ENV = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")  # comma-separated hosts of a TPU pod slice

COMPILE_CACHE_ENV = "JAXGEN_COMPILE_CACHE"  # a directory, or "off"; the binaries' --compile_cache default


class DistributedError(ValueError):
    """The processes of a run could not start together or do not agree; the message says what to do (a user error:
    the binaries print it as one line)."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What `jax.distributed.initialize` needs when the environment does not say it (None: auto-detect).

    coordinator_address: "host:port" of process 0, which hosts the coordination service.
    coordinator_bind_address: "ip:port" that service listens on (default: every interface, at the same port).
    initialization_timeout_s: how long a process waits for all the others to connect before it fails.
    heartbeat_timeout_s: how long after a process stops answering the others give up (and exit).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_bind_address: str | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def check(self) -> None:
        n, i = self.num_processes, self.process_id
        if n is not None and n < 1:
            raise DistributedError(f"--num_processes={n} must be >= 1")
        if i is not None and (i < 0 or (n is not None and i >= n)):
            raise DistributedError(f"--process_id={i} must be in [0, --num_processes={n})")
        if n is not None and n > 1 and not self.coordinator_address and not multi_process_env():
            raise DistributedError(
                f"--num_processes={n} needs --coordinator_address=HOST:PORT (process 0's address, the same on "
                f"every process) unless a launcher (SLURM, a TPU pod, Open MPI) sets it"
            )
        for name in ("coordinator_address", "coordinator_bind_address"):
            value = getattr(self, name)
            if value and not _host_port(value):
                raise DistributedError(f"--{name}={value!r} is not HOST:PORT (e.g. 127.0.0.1:8476)")
        for name in ("initialization_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, name) < 1:
                raise DistributedError(f"--{name}={getattr(self, name)} must be >= 1 second")


def _host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def multi_process_env() -> bool:
    """Whether the environment shows a launch of several processes (SLURM, Open MPI, a TPU pod slice,
    JAX_COORDINATOR_ADDRESS, multi-slice TPU)."""
    for present, count in _CLUSTER_ENV:
        if all(v in os.environ for v in present):
            return count is None or int(os.environ.get(count, "1")) > 1
    return any(len([h for h in os.environ.get(v, "").split(",") if h.strip()]) > 1 for v in _TPU_HOSTS_ENV)


def initialize_distributed(settings: DistributedSettings | None = None, *, force: bool = False) -> bool:
    """`jax.distributed.initialize(...)` when the run has several processes: `settings.num_processes > 1`, `force`,
    or a multi-process launcher in the environment. Idempotent, and a no-op on one process. Returns whether the
    distributed runtime is up. Raises `DistributedError` (one line: who could not reach whom, what to check)."""
    s = settings or DistributedSettings()
    if jax.distributed.is_initialized():
        return True
    s.check()
    several = s.num_processes > 1 if s.num_processes is not None else multi_process_env()
    if not (several or force):
        return False
    # The CPU client's cross-process collectives (no effect on GPU / TPU devices); before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = dict(
        coordinator_address=s.coordinator_address,
        num_processes=s.num_processes,
        process_id=s.process_id,
        coordinator_bind_address=s.coordinator_bind_address,
    )
    where = s.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the auto-detected coordinator"
    failed = (
        f"process {s.process_id if s.process_id is not None else '?'} of {s.num_processes or '?'} could not join the "
        f"run at {where} within {s.initialization_timeout_s} s"
    )
    advice = (
        "Start every process (process 0 hosts the coordinator) with the same --coordinator_address and "
        "--num_processes, check that the address and port are reachable from every host, or raise "
        "--initialization_timeout_s"
    )
    # jaxlib aborts the process (a C++ fatal error, not an exception) when its own deadline passes: a watchdog ends
    # it first, with one line, and JAX's deadline is set a little later.
    joined = _exit_unless_set_within(s.initialization_timeout_s, f"{failed}: nobody answered. {advice}")
    try:
        jax.distributed.initialize(
            **{k: v for k, v in kw.items() if v is not None},
            initialization_timeout=s.initialization_timeout_s + 30,
            heartbeat_timeout_seconds=s.heartbeat_timeout_s,
        )
    except Exception as e:  # jaxlib raises XlaRuntimeError (UNAVAILABLE, INVALID_ARGUMENT, ...) or ValueError
        reason = " ".join(str(e).split())[:300]
        raise DistributedError(f"{failed} ({type(e).__name__}: {reason}). {advice}") from e
    finally:
        joined.set()
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def _exit_unless_set_within(seconds: float, message: str) -> threading.Event:
    """An event; unless it is set within `seconds`, print `error: message` on stderr and end the process (status
    1) from a watchdog thread."""
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watch, name="jaxgen-distributed-watchdog", daemon=True).start()
    return done


def check_same_run(identity: dict[str, Any]) -> None:
    """With several processes: every process must pass the same `identity` (config, workdir, ...), else a
    `DistributedError` naming the processes that differ from process 0. One small host collective; a no-op on
    one process."""
    if jax.process_count() < 2:
        return
    from jax.experimental import multihost_utils

    text = json.dumps(identity, sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 4]
    differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise DistributedError(
            f"processes {differ} were started with another {' / '.join(identity)} than process 0 (this is "
            f"process {jax.process_index()}): start every process with the same command, only the process id "
            f"differing"
        )


def barrier(name: str) -> None:
    """Wait until every process has reached `barrier(name)`; a no-op on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def default_compile_cache_dir() -> str:
    """`$JAXGEN_COMPILE_CACHE`, else `$XDG_CACHE_HOME/jaxgen/xla` (~/.cache/jaxgen/xla)."""
    if os.environ.get(COMPILE_CACHE_ENV):
        return os.environ[COMPILE_CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxgen", "xla")


def enable_compile_cache(directory: str | None) -> str | None:
    """JAX's persistent compilation cache in `directory` (a local path or gs://...); "" / "off" / None: off.
    Compilations of 1 s or more are stored; a later process with the same program, JAX version and devices
    loads them instead of compiling. Returns the directory in use (None when off)."""
    if not directory or directory.lower() == "off":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if "://" not in directory:
        directory = str(Path(directory).expanduser().absolute())
        Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
