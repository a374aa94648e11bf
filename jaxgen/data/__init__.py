"""Data: image sources (digits, folder, tfds), pre-tokenized shards and grain pipelines, selected by `cfg.data`.

Modules, each importing only those above it: `config` (fields, `parse_config`), `records` (skip records, label
check), `transforms` -> `sources` (images), `tokens` (reading token shards) -> `loading` (`load_source`) ->
`pipeline` (grain iterators) -> `pretokenize` (writing keyed token shards). See `config.DEFAULTS` for the fields.
"""

from jaxgen.data.config import DEFAULTS, DataConfig, SourceConfig, parse_config, with_source
from jaxgen.data.loading import load_source
from jaxgen.data.pipeline import check_class_count, load_eval_arrays, make_train_iterator
from jaxgen.data.pretokenize import (
    ensure_token_shards,
    params_fingerprint,
    token_shards_key,
    token_shards_match,
    write_token_shards,
)
from jaxgen.data.records import LabelRangeError, skipped_count, skipped_images
from jaxgen.data.tokens import read_token_metadata
from jaxgen.data.transforms import ImageModeError

__all__ = [
    "DEFAULTS",
    "DataConfig",
    "ImageModeError",
    "LabelRangeError",
    "SourceConfig",
    "check_class_count",
    "ensure_token_shards",
    "load_eval_arrays",
    "load_source",
    "make_train_iterator",
    "params_fingerprint",
    "parse_config",
    "read_token_metadata",
    "skipped_count",
    "skipped_images",
    "token_shards_key",
    "token_shards_match",
    "with_source",
    "write_token_shards",
]
