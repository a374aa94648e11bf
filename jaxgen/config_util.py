"""Load `configs/NAME.py[:arg]` files (each defines `get_config(arg) -> ml_collections.ConfigDict`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`"configs/var_imagenet.py:d16"` -> the ConfigDict that file's get_config("d16") returns."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found (expected configs/NAME.py[:variant])")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
