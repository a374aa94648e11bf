"""Reading pre-tokenized datasets: a directory of token-id shards as a random-access source.

One directory holds one split: `tokens-NNNNN.npy` int32 [n, L], `labels-NNNNN.npy` int32 [n] and `meta.json`
(written last, so a directory with a meta.json is whole). `jaxgen.data.pretokenize` writes them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxgen.data.records import check_label

FORMAT = "jaxgen.tokens/2"  # /2: meta.json has "key" and source is a dict
RESERVED_KEYS = ("format", "split", "num_examples", "seq_len", "num_classes", "source", "image_size", "shards", "key")


def read_token_metadata(path: str | os.PathLike) -> dict:
    """meta.json of a token directory: format, split, num_examples, seq_len, num_classes, source (a dict), image_size,
    shards, skipped_images, key (see `pretokenize.token_shards_key`), plus the caller's `metadata` keys."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path} is not a complete token directory (no meta.json). Write it with "
            "jaxgen.data.write_token_shards(encode_fn, data_cfg, out_dir, split=..., tokenizer=...)."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{meta_path}: not a {FORMAT} token directory (format={meta.get('format')!r}): write it again with "
            "jaxgen.data.write_token_shards."
        )
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
                f"split (write_token_shards(..., split={split!r})) and point data.source.path at it."
            )
        self._dir = path
        shards = self.meta["shards"]
        self._files = [s["tokens"] for s in shards]
        self._starts = np.cumsum([0] + [s["num_examples"] for s in shards])
        self._labels = np.concatenate([np.load(os.path.join(path, s["labels"])) for s in shards])
        self._tokens = None
        self.num_classes = int(self.meta["num_classes"])
        self.seq_len = int(self.meta["seq_len"])
        source = self.meta["source"]
        source = " ".join(str(v) for v in source.values()) if isinstance(source, dict) else source
        self.description = (
            f"tokens {path} [{split}]: {len(self)} x {self.seq_len} ids from {source}, {self.num_classes} classes"
        )
        if self.num_classes and len(self._labels):  # all labels are in memory: check them once, here
            worst = int(np.argmax((self._labels < 0) | (self._labels >= self.num_classes)))
            check_label({"label": self._labels[worst]}, num_classes=self.num_classes, description=self.description)

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
