"""Paths that may be local or a bucket URL (`gs://bucket/run`): `etils.epath`, the path type Orbax uses too.

workdir = as_path("gs://bucket/runs/var_d16")   # kept as a URL (pathlib would turn it into "gs:/bucket/...")
workdir = as_path("~/runs/x")                   # local: expanded and absolute
tokens = host_cache_dir("tokens", str(workdir))  # ~/.cache/jaxgen/tokens/<hash>: this host's own copy
"""

from __future__ import annotations

import hashlib
import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://, s3://, ...) rather than a local or mounted filesystem."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: URLs unchanged, local paths with ~ expanded and made absolute."""
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def host_cache_dir(kind: str, key: str) -> epath.Path:
    """A directory of this host's for `kind` data derived from `key` (e.g. a bucket workdir's token shards, which are
    memory-mapped and so need a local file): `$XDG_CACHE_HOME/jaxgen/<kind>/<sha256(key)[:16]>`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return epath.Path(base) / "jaxgen" / kind / hashlib.sha256(key.encode()).hexdigest()[:16]
