"""grain pipelines over a source: the checkpointable training iterator, ordered batches, eval arrays."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import grain
import jax
import numpy as np
from absl import flags

from jaxgen.data import transforms
from jaxgen.data.config import DataConfig, parse_config
from jaxgen.data.loading import load_source
from jaxgen.data.records import check_label, keep_record


def check_class_count(source, num_classes: int | None) -> None:
    """Refuses (one line) a source with more classes than the model's `num_classes` (None: no model to match)."""
    if num_classes is not None and source.num_classes > num_classes:
        raise ValueError(
            f"{source.description}: the dataset has {source.num_classes} classes but the generator has "
            f"num_classes={num_classes}: set the generator's num_classes to >= {source.num_classes} or use a "
            "dataset with fewer classes."
        )


def _checked(ds, source, num_classes: int | None):
    """`ds` (records of `source`) without skip records and with every label checked against the class range."""
    bound = source.num_classes or (num_classes or 0)  # an unconditional source: the model's range, if given
    check = functools.partial(check_label, num_classes=bound, description=source.description)
    return ds.filter(keep_record).map(check)


class _HostRows(grain.MapDataset):
    """Host `host`'s rows of every global batch of `global_batch` consecutive elements of `parent`: element i is
    parent[(i // b) * global_batch + host * b + i % b], b = global_batch / hosts."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, hosts: int, host: int):
        super().__init__(parent)
        self._global, self._local, self._host = global_batch, global_batch // hosts, host

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._host * self._local + row]


def make_train_iterator(
    data_cfg: Mapping | DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    split: str | None = None,
    num_classes: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, per-host batches of the train split (or `split`), as a checkpointable grain iterator.

    One global order for any number of hosts: the examples shuffled with `seed` (a new order every epoch), flipped
    left-right with probability 1/2 if `data.random_flip`, cut into global batches of `global_batch_size`; each of
    the `jax.process_count()` hosts reads only its own b = global_batch_size / process_count rows of every global
    batch (host h: rows h*b ... (h+1)*b - 1), so a run on N hosts sees the same global batches as one host. Yields
    numpy dicts
    `{"image": float32 [b, H, W, 3] in [-1, 1], "label": int32 [b]}` (tokens source:
    `{"tokens": int32 [b, L], "label": int32 [b]}`). Unreadable images are skipped (`skipped_images()`).
    `it.get_state()` / `it.set_state(state)` (a JSON-able dict) resume it exactly. A label outside the source's
    classes raises `LabelRangeError`; `num_classes` (the generator's) refuses a dataset with more classes up front.
    """
    cfg = parse_config(data_cfg)
    source = load_source(cfg, cfg.train_split if split is None else split)
    check_class_count(source, num_classes)
    if cfg.random_flip and cfg.source.kind == "tokens":
        raise ValueError("data.random_flip=True cannot flip token ids (data.source.kind='tokens'): set it False.")
    hosts, host = jax.process_count(), jax.process_index()
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1 or global_batch_size % hosts:
        raise ValueError(
            f"global_batch_size={global_batch_size!r} must be a positive multiple of jax.process_count()={hosts}."
        )
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    batch_size = global_batch_size // hosts
    if global_batch_size > len(source):
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the dataset: {source.description} has "
            f"{len(source)} examples."
        )
    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat()
    if cfg.random_flip:
        ds = ds.random_map(transforms.random_flip)  # before the host split: a flip belongs to the global position
    it = _HostRows(ds, global_batch_size, hosts, host).to_iter_dataset()
    if cfg.worker_count:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use their defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    it = _checked(it, source, num_classes).batch(batch_size, drop_remainder=True).map(transforms.to_float_batch)
    return iter(it)


def ordered_batches(
    source, batch_size: int, limit: int | None = None, num_classes: int | None = None
) -> Iterator[dict]:
    """The first `limit` (None = all) records of `source` in order, unreadable ones dropped, labels checked as in
    `make_train_iterator`, in float batches; the last batch may be smaller."""
    ds = grain.MapDataset.source(source)
    if limit is not None:
        ds = ds[:limit]
    it = _checked(ds.to_iter_dataset(), source, num_classes)
    return iter(it.batch(batch_size).map(transforms.to_float_batch))


def load_eval_arrays(
    data_cfg: Mapping | DataConfig, split: str, max_examples: int | None = None, num_classes: int | None = None
) -> dict[str, np.ndarray]:
    """The first `max_examples` (None = all) examples of `split`, in order, no flip, minus unreadable ones:
    `{"image": float32 [N, H, W, 3] in [-1, 1], "label": int32 [N]}` (tokens source: `{"tokens": int32 [N, L],
    "label": int32 [N]}`). Labels and `num_classes` are checked as in `make_train_iterator`."""
    source = load_source(data_cfg, split)
    check_class_count(source, num_classes)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
    batches = list(ordered_batches(source, 256, max_examples, num_classes))
    if not batches:
        raise ValueError(f"No readable example in split {split!r}; see jaxgen.data.skipped_images().")
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
