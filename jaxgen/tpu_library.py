"""Where the TPU compiler (libtpu) is, for compiling TPU programs on a machine without TPUs (`jaxgen.aot`).

`make setup` puts libtpu in `.venv/libtpu/`, outside the import path: installed the usual way (`pip install
'jax[tpu]'`) it would make every JAX start on a CPU or GPU machine probe for TPUs (seconds, and lines of libtpu
warnings). `use_side_installed_libtpu()` points JAX at it (`TPU_LIBRARY_PATH`), which JAX reads when it first needs
the TPU plugin, even after the CPU backend is up. On a TPU VM, where libtpu is installed normally, it does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SIDE_DIR = Path(sys.prefix) / "libtpu"  # pip install --no-deps --target .venv/libtpu libtpu==<jax's pin>


def use_side_installed_libtpu() -> str | None:
    """Set `TPU_LIBRARY_PATH` to the side-installed libtpu.so unless one is set or `libtpu` imports; returns the
    library path JAX will use (None: no libtpu anywhere: TPU topologies are unavailable)."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    if importlib.util.find_spec("libtpu") is not None:
        return str(Path(importlib.util.find_spec("libtpu").origin).parent / "libtpu.so")
    library = SIDE_DIR / "libtpu" / "libtpu.so"
    if library.is_file():
        os.environ["TPU_LIBRARY_PATH"] = str(library)
        return str(library)
    return None
