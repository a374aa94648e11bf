"""The `cfg.data` section: its fields, defaults and validation (`parse_config`). Imports nothing else of jaxgen.

```python
data = dict(
    source=dict(kind="digits", path="", name="", data_dir=""),
    image_size=16, train_split="train", eval_split="test", random_flip=False, convert_to_rgb=False, worker_count=0,
)
```
`source.kind` is "digits" (scikit-learn's bundled scans), "folder" (`path`: an image tree), "tfds" (`name`, optional
`data_dir`) or "tokens" (`path`: a directory written by `write_token_shards`). Every error names the config field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

SOURCE_DEFAULTS = dict(
    kind="digits",  # "digits" | "folder" | "tfds" | "tokens"
    path="",  # folder / tokens: the directory
    name="",  # tfds: the dataset name, e.g. "imagenet2012" or "imagenet2012:5.1.0"
    data_dir="",  # tfds: where it is prepared ("" = tfds default)
)
DEFAULTS = dict(
    source=SOURCE_DEFAULTS,
    image_size=16,  # output H = W in pixels
    train_split="train",
    eval_split="test",
    random_flip=False,  # horizontal flip augmentation (train only)
    convert_to_rgb=False,  # False: a non-RGB image anywhere is an error; True: convert it
    worker_count=0,  # grain worker processes (0 = in-process)
)

# kind -> the source fields it reads (and must be set: the first of them)
_KIND_FIELDS = {"digits": (), "folder": ("path",), "tfds": ("name", "data_dir"), "tokens": ("path",)}
_KIND_HELP = (
    "use 'digits', 'folder' (with data.source.path), 'tfds' (with data.source.name) or 'tokens' (with data.source.path)"
)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Validated `cfg.data.source`; field meanings as in `SOURCE_DEFAULTS` (unused fields are "")."""

    kind: str
    path: str = ""
    name: str = ""
    data_dir: str = ""

    def describe(self) -> str:
        """For messages and logs: "digits", "folder /x", "tfds imagenet2012", "tokens /x"."""
        return self.kind + (f" {self.path or self.name}" if self.path or self.name else "")

    def identity(self) -> dict:
        """What the records depend on (kind + path / name), as a JSON-able dict: part of a token-shard key."""
        return {"kind": self.kind, **{f: getattr(self, f) for f in ("path", "name") if getattr(self, f)}}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Validated `cfg.data`; field meanings as in `DEFAULTS`."""

    source: SourceConfig
    image_size: int
    train_split: str
    eval_split: str
    random_flip: bool
    convert_to_rgb: bool
    worker_count: int


def _as_dict(section, field: str) -> dict:
    if isinstance(section, str):
        kind, _, arg = section.partition(":")
        hint = f"dict(kind={kind!r}, {'name' if kind == 'tfds' else 'path'}={arg!r})" if arg else f"dict(kind={kind!r})"
        raise ValueError(f"{field}={section!r} is the old string form: write {field}={hint}.")
    if not isinstance(section, Mapping) and not hasattr(section, "keys"):
        raise ValueError(f"{field} must be a dict (a config section), got {type(section).__name__} {section!r}.")
    return {k: section[k] for k in section.keys()}


def _check_known(fields: dict, known: Mapping, field: str) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(
            f"{field}.{unknown[0]} is not a {field} field (known: {', '.join(known)}): remove it or fix the spelling."
        )


def parse_source(section) -> SourceConfig:
    """`cfg.data.source` (dict / ConfigDict; missing fields are "") -> `SourceConfig`, with one-line errors."""
    fields = _as_dict(section, "data.source")
    _check_known(fields, SOURCE_DEFAULTS, "data.source")
    fields = {**SOURCE_DEFAULTS, **fields}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise ValueError(f"data.source.{k} must be a string, got {v!r}.")
    kind = fields["kind"]
    if kind not in _KIND_FIELDS:
        raise ValueError(f"data.source.kind={kind!r} is not a source kind: {_KIND_HELP}.")
    needed = _KIND_FIELDS[kind][:1]
    for k in needed:
        if not fields[k]:
            what = "the dataset name, e.g. 'imagenet2012'" if k == "name" else "the directory"
            raise ValueError(f"data.source.{k} is empty: data.source.kind={kind!r} needs {what}; set it.")
    for k in ("path", "name", "data_dir"):
        if fields[k] and k not in _KIND_FIELDS[kind]:
            raise ValueError(
                f"data.source.{k}={fields[k]!r} has no meaning for data.source.kind={kind!r}: clear it, or set the "
                f"kind that reads it ({_KIND_HELP})."
            )
    path = os.path.abspath(os.path.expanduser(fields["path"])) if fields["path"] else ""
    data_dir = os.path.expanduser(fields["data_dir"]) if fields["data_dir"] else ""
    return SourceConfig(kind=kind, path=path, name=fields["name"], data_dir=data_dir)


def parse_config(data_cfg: Mapping | DataConfig) -> DataConfig:
    """`cfg.data` (dict or ConfigDict; missing fields take `DEFAULTS`) -> `DataConfig`, with one-line errors."""
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    fields = _as_dict(data_cfg, "data")
    _check_known(fields, DEFAULTS, "data")
    fields = {**DEFAULTS, **fields}
    size = fields["image_size"]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 8 <= size <= 8192:
        raise ValueError(f"data.image_size must be an integer number of pixels in [8, 8192], got {size!r}.")
    workers = fields["worker_count"]
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"data.worker_count must be an integer >= 0, got {workers!r}.")
    for k in ("train_split", "eval_split"):
        if not isinstance(fields[k], str) or not fields[k]:
            raise ValueError(f"data.{k} must be a non-empty split name, got {fields[k]!r}.")
    for k in ("random_flip", "convert_to_rgb"):
        if not isinstance(fields[k], (bool, np.bool_)):
            raise ValueError(f"data.{k} must be True or False, got {fields[k]!r}.")
    return DataConfig(
        source=parse_source(fields["source"]),
        image_size=int(size),
        train_split=fields["train_split"],
        eval_split=fields["eval_split"],
        random_flip=bool(fields["random_flip"]),
        convert_to_rgb=bool(fields["convert_to_rgb"]),
        worker_count=int(workers),
    )


def with_source(data_cfg: Mapping | DataConfig, **source) -> DataConfig:
    """`data_cfg` with its source replaced, e.g. `with_source(cfg.data, kind="tokens", path=tokens_dir)`."""
    return dataclasses.replace(parse_config(data_cfg), source=parse_source(source))
