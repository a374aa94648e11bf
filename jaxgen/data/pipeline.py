"""grain pipelines over a source: the checkpointable training iterator, ordered batches, eval arrays."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grain
import jax
import numpy as np
from absl import flags

from jaxgen.data import sources, transforms


def make_train_iterator(
    data_cfg: Mapping, *, global_batch_size: int, seed: int, split: str | None = None
) -> grain.DatasetIterator:
    """Infinite, shuffled, per-host batches of the train split (or `split`), as a checkpointable grain iterator.

    Each of the `jax.process_count()` hosts reads its own contiguous 1/count of the examples, shuffled with
    `seed` (a new order every epoch), flipped left-right with probability 1/2 if `data.random_flip`, batched with
    drop_remainder to b = global_batch_size / process_count. Yields numpy dicts
    `{"image": float32 [b, H, W, 3] in [-1, 1], "label": int32 [b]}` (tokens source:
    `{"tokens": int32 [b, L], "label": int32 [b]}`). Unreadable images are skipped (`skipped_images()`).
    `it.get_state()` / `it.set_state(state)` (a JSON-able dict) resume it exactly.
    """
    cfg = sources.parse_config(data_cfg)
    source = sources.load_source(cfg, cfg.train_split if split is None else split)
    if cfg.random_flip and cfg.source.startswith("tokens:"):
        raise ValueError(f"data.random_flip=True cannot flip token ids ({cfg.source!r}); set random_flip=False.")
    hosts, host = jax.process_count(), jax.process_index()
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1 or global_batch_size % hosts:
        raise ValueError(
            f"global_batch_size={global_batch_size!r} must be a positive multiple of jax.process_count()={hosts}."
        )
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    batch_size, per_host = global_batch_size // hosts, len(source) // hosts
    if batch_size > per_host:
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the dataset: {source.description} gives "
            f"{per_host} examples to each of {hosts} host(s), fewer than the per-host batch of {batch_size}."
        )
    ds = grain.MapDataset.source(source)[host * per_host : (host + 1) * per_host]
    ds = ds.seed(int(seed)).shuffle().repeat()
    if cfg.random_flip:
        ds = ds.random_map(transforms.random_flip)
    it = ds.to_iter_dataset()
    if cfg.worker_count:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use their defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    it = it.filter(sources.keep_record).batch(batch_size, drop_remainder=True).map(transforms.to_float_batch)
    return iter(it)


def ordered_batches(source, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """The first `limit` (None = all) records of `source` in order, unreadable ones dropped, in float batches;
    the last batch may be smaller."""
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[:limit]
    it = ds.to_iter_dataset().filter(sources.keep_record)
    return iter(it.batch(batch_size).map(transforms.to_float_batch))


def load_eval_arrays(data_cfg: Mapping, split: str, max_examples: int | None = None) -> dict[str, np.ndarray]:
    """The first `max_examples` (None = all) examples of `split`, in order, no flip, minus unreadable ones:
    `{"image": float32 [N, H, W, 3] in [-1, 1], "label": int32 [N]}` (tokens source: `{"tokens": int32 [N, L],
    "label": int32 [N]}`)."""
    source = sources.load_source(data_cfg, split)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
    batches = list(ordered_batches(source, 256, max_examples))
    if not batches:
        raise ValueError(f"No readable example in split {split!r}; see jaxgen.data.skipped_images().")
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
