"""Data: image sources (digits, folder, tfds), pre-tokenized shards and grain pipelines, selected by `cfg.data`.

See `sources.DEFAULTS` for the config fields.
"""

from jaxgen.data.pipeline import load_eval_arrays, make_train_iterator
from jaxgen.data.sources import DEFAULTS, DataConfig, load_source, parse_config, skipped_count, skipped_images
from jaxgen.data.tokens import read_token_metadata, write_token_shards

__all__ = [
    "DEFAULTS",
    "DataConfig",
    "load_eval_arrays",
    "load_source",
    "make_train_iterator",
    "parse_config",
    "read_token_metadata",
    "skipped_count",
    "skipped_images",
    "write_token_shards",
]
