"""What the binaries (`jaxgen.main`, `jaxgen.sample`) share: user errors end in one line, not a traceback.

    def main(argv):
        report = cli.run_user_command(train_and_evaluate, config, workdir, user_errors=(TrainingError,))

    app.run(main, flags_parser=cli.parse_flags)  # a bad flag, config file or --config override: one line too

A user error (a config that cannot work, a missing file, a read-only workdir, a damaged checkpoint, Ctrl-C, a
preemption) prints `error: <what is wrong and what to do>` as the only line on stderr from that point and exits with
status 1 (or the exception's `exit_code`, e.g. 143 after SIGTERM, 130 after Ctrl-C); the traceback is logged at
debug level, which absl prints with `--verbosity=1`. Anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from absl import flags, logging

T = TypeVar("T")

# Errors whose message is written for the user: jaxgen raises these with a sentence saying what to do.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
EXIT_USER_ERROR = 1
EXIT_USAGE = 2  # a bad flag (as argparse)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def one_line(message: str, limit: int = 2000) -> str:
    """`message` with its whitespace (newlines included) collapsed, cut to `limit` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(message: str, exit_code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `error: message` (one line) on stderr and exit with `exit_code`."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _background_errors_to_debug_log() -> Callable[[], None]:
    """Route exceptions that C++ threads print (TensorStore's callbacks call PyErr_Print / PyErr_WriteUnraisable)
    to the debug log; the main thread's keep the usual hooks. Why: when one read of a damaged checkpoint fails,
    Orbax closes its event loop while other reads are in flight, and their completions print "RuntimeError: Event
    loop is closed" tracebacks, which would bury the one-line error. Returns a function that restores the hooks."""
    old_hook, old_unraisable = sys.excepthook, sys.unraisablehook

    def hook(exc_type, exc, tb):
        if threading.current_thread() is threading.main_thread():
            old_hook(exc_type, exc, tb)
        else:
            logging.debug("in a background thread", exc_info=(exc_type, exc, tb))

    def unraisable(u):
        if threading.current_thread() is threading.main_thread():
            old_unraisable(u)
        else:
            logging.debug(
                "ignored in a background thread (%s)", u.object, exc_info=(u.exc_type, u.exc_value, u.exc_traceback)
            )

    sys.excepthook, sys.unraisablehook = hook, unraisable

    def restore():
        sys.excepthook, sys.unraisablehook = old_hook, old_unraisable

    return restore


_hooks_installed = False


def run_user_command(
    fn: Callable[..., T], *args: Any, user_errors: tuple[type[BaseException], ...] = (), **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)`, with `USER_ERRORS`, `user_errors` and KeyboardInterrupt turned into one `error:` line
    and an exit status (the traceback goes to the debug log: `--verbosity=1`). Calls may nest."""
    global _hooks_installed
    restore = None
    if not _hooks_installed:
        restore, _hooks_installed = _background_errors_to_debug_log(), True
    try:
        result = fn(*args, **kwargs)
    except KeyboardInterrupt:
        logging.debug("traceback of the interrupt", exc_info=True)
        fail(
            "interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint it wrote",
            EXIT_INTERRUPTED,
        )
    except (*USER_ERRORS, *user_errors) as e:
        logging.debug("traceback of the error below", exc_info=True)
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        fail(message, int(getattr(e, "exit_code", EXIT_USER_ERROR)))
    # On the failure paths above the hooks stay: the process is ending, and late completions must stay quiet.
    if restore is not None:
        restore()
        _hooks_installed = False
    return result


def _verbose(argv: list[str]) -> bool:
    """Whether argv asks for --verbosity >= 1 (flags may not be parsed yet)."""
    for arg in argv[1:]:
        m = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", arg)
        if m and int(m.group(1)) >= 1:
            return True
    return False


def flag_error_text(e: BaseException) -> str:
    """One line for a flag-parsing error. ml_collections puts a config file's traceback inside the flag error's
    text: keep its first line (which flag) and its last (the exception), drop the frames between."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
    if "Traceback (most recent call last)" in text:
        head, _, rest = text.partition("Traceback (most recent call last)")
        last = [x for x in rest.splitlines() if x.strip()][-1].strip()
        text = f"{head.strip().rstrip(':')}: {last}"
    elif isinstance(e, KeyError):  # ml_collections: "'train_tokenizr'\nDid you mean ...?"
        text = f"--config has no field {text}"
    elif re.fullmatch(r"'.*\\nDid you mean.*'", text, re.S):  # a nested field: the KeyError's repr, quoted
        text = "--config has no field " + text[1:-1].replace("\\'", "'").replace("\\n", " ")
    return one_line(text)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for `app.run(main, flags_parser=cli.parse_flags)`: a bad flag, a config file that raises
    or a --config override of a field that does not exist ends in one `error:` line and exit status 2 (the
    traceback too with --verbosity=1), instead of absl's usage text or ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        if _verbose(argv):
            traceback.print_exc()
        fail(f"{flag_error_text(e)} (see --helpshort)", EXIT_USAGE)


# ---- several processes and the compile cache: flags both binaries take ----------------------------------------------

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for a manual multi-process launch (TPU pods and SLURM: "
    "auto-detected); the same on every process"
)  # fmt: skip
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (manual launch)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (manual launch)")
_BIND = flags.DEFINE_string(
    "coordinator_bind_address", None, "IP:PORT process 0's coordinator listens on (default: all interfaces)"
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_s", 300, "seconds each process waits for all the others to join before it fails"
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "seconds after which the others give up on a process that stopped answering"
)
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", None, "persistent XLA compilation cache directory (local or gs://), 'off' to disable; default "
    "$JAXGEN_COMPILE_CACHE, else ~/.cache/jaxgen/xla"
)  # fmt: skip


def start_processes() -> None:
    """What both binaries do before anything touches a device: turn on the compile cache (--compile_cache) and,
    for a run of several processes, start `jax.distributed` (flags, else the launcher's environment)."""
    from jaxgen.parallel import distributed

    value = lambda holder: holder.value if flags.FLAGS.is_parsed() else holder.default  # called from Python too
    cache = value(_COMPILE_CACHE) if value(_COMPILE_CACHE) is not None else distributed.default_compile_cache_dir()
    used = distributed.enable_compile_cache(cache)
    settings = distributed.DistributedSettings(
        coordinator_address=value(_COORDINATOR),
        num_processes=value(_NUM_PROCESSES),
        process_id=value(_PROCESS_ID),
        coordinator_bind_address=value(_BIND),
        initialization_timeout_s=value(_INIT_TIMEOUT),
        heartbeat_timeout_s=value(_HEARTBEAT),
    )
    distributed.initialize_distributed(settings)
    logging.info("compile cache: %s", used or "off")


def check_writable_dir(path: str | Path, flag: str = "--workdir") -> Path:
    """Check, before any work, that `path` is (or can be created as) a writable directory, creating nothing: the
    directory, or its nearest existing ancestor, must be a directory in which a probe file can be created and
    deleted (`os.access` alone is not enough: it says yes to root on a read-only mount). Raises PermissionError /
    NotADirectoryError with a message naming `flag`."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"is inside {existing}, which is a file"
        raise NotADirectoryError(f"{flag}={path} {where}, not a directory: choose another {flag}")
    reason = None if os.access(existing, os.W_OK | os.X_OK) else "no write permission"
    if reason is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".jaxgen_write_probe_", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror or type(e).__name__
    if reason is not None:
        what = (
            f"{flag}={path} is not writable"
            if existing == path.absolute()
            else (f"{flag}={path} cannot be created: {existing} is not writable")
        )
        raise PermissionError(
            f"{what} ({reason}): choose a directory you can write, or fix its permissions (e.g. chmod u+w {existing})"
        )
    return path


def require_sections(config: Any, names: list[str] | tuple[str, ...], source: str, why: str = "") -> None:
    """Raise ValueError naming the top-level fields of `config` (a ConfigDict) in `names` that it lacks."""
    missing = [n for n in names if n not in config]
    if missing:
        listed = ", ".join(f"`{n}`" for n in missing)
        raise ValueError(
            f"{source} has no {listed} section{'s' if len(missing) > 1 else ''}{f' ({why})' if why else ''}: add "
            f"{'them' if len(missing) > 1 else 'it'} to its get_config() (see configs/digits_var.py for the fields)"
        )
