"""Pre-tokenized datasets: encode a split once with a tokenizer, store token ids as .npy shards, read them back.

One directory holds one split: `tokens-NNNNN.npy` int32 [n, L], `labels-NNNNN.npy` int32 [n] and `meta.json`.
It is built under a hidden temporary name beside `out_dir` and renamed into place when complete, so a
directory with a meta.json is whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import jax
import numpy as np

from jaxgen.data import pipeline, sources

FORMAT = "jaxgen.tokens/1"
_RESERVED = ("format", "split", "num_examples", "seq_len", "num_classes", "source", "image_size", "shards")


def read_token_metadata(path: str | os.PathLike) -> dict:
    """meta.json of a token directory: format, split, num_examples, seq_len, num_classes, source, image_size,
    shards, skipped_images, plus the caller's `metadata` keys (e.g. tokenizer config, checkpoint step)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path} is not a complete token directory (no meta.json). Write it with "
            "jaxgen.data.write_token_shards(encode_fn, data_cfg, out_dir, split=...)."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} token directory (format={meta.get('format')!r}).")
    return meta


class TokenSource:
    """Random access to shards written by `write_token_shards`: records `{"tokens": int32 [L], "label": int32}`.

    Token shards are memory-mapped on first access in each process (cheap to pickle into grain workers).
    """

    def __init__(self, path: str, split: str):
        self.meta = read_token_metadata(path)
        if split != self.meta["split"]:
            raise ValueError(
                f"Token directory {path} holds split {self.meta['split']!r}, not {split!r}: write one directory per "
                f"split (write_token_shards(..., split={split!r})) and point data.source at it."
            )
        self._dir = path
        shards = self.meta["shards"]
        self._files = [s["tokens"] for s in shards]
        self._starts = np.cumsum([0] + [s["num_examples"] for s in shards])
        self._labels = np.concatenate([np.load(os.path.join(path, s["labels"])) for s in shards])
        self._tokens = None
        self.num_classes = int(self.meta["num_classes"])
        self.seq_len = int(self.meta["seq_len"])
        self.description = (
            f"tokens {path} [{split}]: {len(self)} x {self.seq_len} ids from {self.meta['source']}, "
            f"{self.num_classes} classes"
        )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __getitem__(self, index: int) -> dict:
        if self._tokens is None:
            self._tokens = [np.load(os.path.join(self._dir, f), mmap_mode="r") for f in self._files]
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        tokens = np.array(self._tokens[shard][index - self._starts[shard]], dtype=np.int32)
        return {"tokens": tokens, "label": self._labels[index]}


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` to `out_dir`, replacing an earlier token directory (never anything else)."""
    if os.path.exists(out_dir):
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")):
            raise ValueError(f"{out_dir} exists and is not a token directory: choose another out_dir.")
        old = tmp + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def write_token_shards(
    encode_fn: Callable[[np.ndarray], np.ndarray],
    data_cfg: Mapping,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    batch_size: int = 64,
    shard_size: int = 8192,
    metadata: Mapping | None = None,
) -> str | os.PathLike:
    """Encodes every image of `split` once (in order, no flip) into the token directory `out_dir`; returns it.

    `encode_fn(images float32 [batch_size, H, W, 3] in [-1, 1]) -> int [batch_size, L]`: every call gets a full
    batch (the last one is zero-padded and its padding dropped), so a jitted encoder compiles once. Unreadable
    images are skipped (see `skipped_images()`). `metadata` (JSON-serialisable, e.g. the tokenizer config and
    checkpoint step) is merged into meta.json. An earlier token directory at `out_dir` is replaced. Only process 0
    writes: on several hosts, sync them (e.g. `multihost_utils.sync_global_devices`) before reading.
    """
    cfg = sources.parse_config(data_cfg)
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & {*_RESERVED, "skipped_images"})
    if clash:
        raise ValueError(f"write_token_shards: metadata keys {clash} are reserved for meta.json's own fields.")
    try:
        metadata = json.loads(json.dumps(metadata))
    except TypeError as e:
        raise ValueError(f"write_token_shards: metadata must be JSON-serialisable: {e}") from None
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    source = sources.load_source(cfg, split)
    if isinstance(source, TokenSource):
        raise ValueError(f"write_token_shards needs an image source, got {cfg.source!r}.")
    writer = jax.process_index() == 0
    out_dir_str = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir_str)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir_str)}.incomplete-", dir=parent)
    try:
        shards, buffer, seq_len = [], [], None

        def flush(final: bool) -> None:
            while buffer and (final or sum(len(t) for t, _ in buffer) >= shard_size):
                tokens = np.concatenate([t for t, _ in buffer])
                labels = np.concatenate([lab for _, lab in buffer])
                buffer.clear()
                if len(tokens) > shard_size:
                    buffer.append((tokens[shard_size:], labels[shard_size:]))
                    tokens, labels = tokens[:shard_size], labels[:shard_size]
                names = {k: f"{k}-{len(shards):05d}.npy" for k in ("tokens", "labels")}
                if writer:
                    np.save(os.path.join(tmp, names["tokens"]), tokens)
                    np.save(os.path.join(tmp, names["labels"]), labels)
                shards.append({**names, "num_examples": len(tokens)})

        for batch in pipeline.ordered_batches(source, batch_size):
            n = len(batch["label"])
            images = np.pad(batch["image"], [(0, batch_size - n)] + [(0, 0)] * 3)
            tokens = np.asarray(encode_fn(images))
            if tokens.ndim != 2 or tokens.shape[0] != batch_size or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(
                    f"encode_fn must map float32 {images.shape} to integer [{batch_size}, L], got "
                    f"{tokens.dtype} {tokens.shape}."
                )
            if seq_len not in (None, tokens.shape[1]):
                raise ValueError(f"encode_fn returned L={tokens.shape[1]} after L={seq_len}.")
            seq_len = tokens.shape[1]
            buffer.append((tokens[:n].astype(np.int32), batch["label"]))
            flush(final=False)
        flush(final=True)
        if seq_len is None:
            raise ValueError(f"No image of {source.description} could be read; see jaxgen.data.skipped_images().")
        num_examples = sum(s["num_examples"] for s in shards)
        meta = dict(
            format=FORMAT,
            split=split,
            num_examples=num_examples,
            seq_len=seq_len,
            num_classes=source.num_classes,
            source=cfg.source,
            image_size=cfg.image_size,
            shards=shards,
            skipped_images=len(source) - num_examples,
            **metadata,
        )
        if writer:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
            _replace_dir(tmp, out_dir_str)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
