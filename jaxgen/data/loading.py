"""`load_source`: the one place a `cfg.data` section becomes a random-access source (image or token ids)."""

from __future__ import annotations

from collections.abc import Mapping

from jaxgen.data.config import DataConfig, parse_config
from jaxgen.data.sources import DigitsSource, FolderSource, TfdsSource
from jaxgen.data.tokens import TokenSource


def load_source(data_cfg: Mapping | DataConfig, split: str):
    """`cfg.data` + split name -> a random-access source (records: see `jaxgen.data.records`).

    Every problem with the source (unknown kind or field, missing path, empty folder, unknown or unprepared tfds
    dataset, non-RGB images without `convert_to_rgb`, bad image_size) is raised here as ValueError /
    FileNotFoundError; a non-RGB image that is not among the few checked here raises when it is read.
    """
    cfg = parse_config(data_cfg)
    s = cfg.source
    if s.kind == "digits":
        return DigitsSource(split, cfg.image_size)
    if s.kind == "folder":
        return FolderSource(s.path, split, cfg.image_size, cfg.convert_to_rgb)
    if s.kind == "tfds":
        return TfdsSource(s.name, split, s.data_dir, cfg.image_size, cfg.convert_to_rgb)
    assert s.kind == "tokens", s  # parse_config admits no other kind
    return TokenSource(s.path, split)
