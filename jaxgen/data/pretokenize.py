"""Writing pre-tokenized datasets: encode a split once with a tokenizer into a token directory keyed by what made it.

The key (`token_shards_key`) is the data source (kind + path / name), the split, the image size and the tokenizer
identity (a JSON-able dict from the caller, e.g. its config and `params_fingerprint(params)`); `token_shards_match`
compares a directory's key with the current one, so a changed source, size or tokenizer re-tokenizes instead of
training on stale ids. The directory is built under a hidden temporary name beside `out_dir` and renamed into place
when complete. Only process 0 writes; every process then waits at a barrier, so other hosts read whole shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import jax
import numpy as np

from jaxgen.data import pipeline
from jaxgen.data.config import DataConfig, parse_config
from jaxgen.data.loading import load_source
from jaxgen.data.tokens import FORMAT, RESERVED_KEYS, TokenSource, read_token_metadata
from jaxgen.parallel.distributed import barrier as sync_hosts  # a no-op on one process


def params_fingerprint(tree) -> str:
    """sha256 (hex) of a params pytree: every leaf's path, dtype, shape and bytes, leaves sorted by path.

    Equal for equal params whatever the container types or device placement; any changed value, dtype, shape or
    name changes it. Leaves must be fully addressable (on several hosts, gather first).
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda item: item[0]):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{path}|{array.dtype.name}|{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _json(value, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"write_token_shards: {what} must be JSON-serialisable: {e}") from None


def token_shards_key(data_cfg: Mapping | DataConfig, *, split: str, tokenizer: Mapping) -> dict:
    """What a token directory's ids depend on, as JSON-able data:
    `{"source": {"kind", "path" | "name"}, "split", "image_size", "tokenizer"}`."""
    cfg = parse_config(data_cfg)
    if not isinstance(tokenizer, Mapping) or not tokenizer:
        raise ValueError(
            f"write_token_shards: tokenizer must be a non-empty dict naming the tokenizer (e.g. its config and "
            f"params_fingerprint(params)), got {tokenizer!r}."
        )
    return {
        "source": cfg.source.identity(),
        "split": split,
        "image_size": cfg.image_size,
        "tokenizer": _json(dict(tokenizer), "tokenizer"),
    }


def _describe(key: Mapping) -> str:
    source = key.get("source", {})
    where = source.get("path") or source.get("name") or ""
    kind = f"{source.get('kind')} {where}".strip()
    return f"data.source={kind} [{key.get('split')}] at {key.get('image_size')} px"


def _flat(tree, prefix: str) -> dict:
    if isinstance(tree, Mapping):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()} or {prefix: {}}
    return {prefix: tree}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 20 else text[:17] + "..."


def token_shards_match(tokens_dir: str | os.PathLike, key: Mapping) -> tuple[bool, str]:
    """(True, why) if `tokens_dir` holds whole token shards written with `key` (from `token_shards_key`), else
    (False, why): missing, from an older format, or what changed, e.g. "tokens in /w/tokens were written from
    data.source=digits [train] at 16 px, now data.source=folder /x [train] at 32 px"."""
    key = json.loads(json.dumps(key))
    try:
        meta = read_token_metadata(tokens_dir)
    except FileNotFoundError:
        return False, f"no complete token directory at {tokens_dir}"
    except ValueError:  # another format, or a damaged meta.json
        return False, f"tokens in {tokens_dir} are not in the current format {FORMAT}"
    old = meta.get("key")
    if old == key:
        return True, f"tokens in {tokens_dir} match ({_describe(key)}, same tokenizer)"
    if not isinstance(old, Mapping):
        return False, f"tokens in {tokens_dir} carry no key (written by an older jaxgen)"
    if any(old.get(k) != key.get(k) for k in ("source", "split", "image_size")):
        return False, f"tokens in {tokens_dir} were written from {_describe(old)}, now {_describe(key)}"
    before, after = _flat(old.get("tokenizer", {}), "tokenizer"), _flat(key.get("tokenizer", {}), "tokenizer")
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = ", ".join(f"{k}: {_short(before.get(k))} -> {_short(after.get(k))}" for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return False, f"tokens in {tokens_dir} were written by another tokenizer ({shown}{more})"


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
    data_cfg: Mapping | DataConfig,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    tokenizer: Mapping,
    batch_size: int = 64,
    shard_size: int = 8192,
    metadata: Mapping | None = None,
    per_host: bool = False,
) -> str | os.PathLike:
    """Encodes every image of `split` once (in order, no flip) into the token directory `out_dir`; returns it.

    `encode_fn(images float32 [batch_size, H, W, 3] in [-1, 1]) -> int [batch_size, L]`: every call gets a full
    batch (the last one is zero-padded and its padding dropped), so a jitted encoder compiles once. Unreadable
    images are skipped (see `skipped_images()`); a label outside the source's classes is an error. `tokenizer`
    (JSON-able, e.g. `{"config": ..., "params": params_fingerprint(params)}`) goes into the key that
    `token_shards_match` checks; `metadata` (JSON-able, e.g. the checkpoint step) is merged into meta.json. An
    earlier token directory at `out_dir` is replaced. Every process runs `encode_fn` on every batch (a sharded
    encoder needs them all); only process 0 writes, then all meet at a barrier, so `out_dir` must be on a filesystem
    that every host sees. `per_host`: every process writes its own `out_dir` (a local disk), with no barrier.
    """
    cfg = parse_config(data_cfg)
    key = token_shards_key(cfg, split=split, tokenizer=tokenizer)
    metadata = _json(dict(metadata or {}), "metadata")
    clash = sorted(set(metadata) & {*RESERVED_KEYS, "skipped_images"})
    if clash:
        raise ValueError(f"write_token_shards: metadata keys {clash} are reserved for meta.json's own fields.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    source = load_source(cfg, split)
    if isinstance(source, TokenSource):
        raise ValueError(f"write_token_shards needs an image source, got data.source={cfg.source.describe()}.")
    writer = per_host or jax.process_index() == 0
    out_dir_str = os.path.abspath(os.fspath(out_dir))
    tmp = None
    if writer:
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
            source=key["source"],
            image_size=cfg.image_size,
            shards=shards,
            key=key,
            skipped_images=len(source) - num_examples,
            **metadata,
        )
        if writer:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
            _replace_dir(tmp, out_dir_str)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if per_host:
        return out_dir
    sync_hosts(f"jaxgen.data.write_token_shards:{out_dir_str}")
    if not writer and not os.path.isfile(os.path.join(out_dir_str, "meta.json")):
        raise FileNotFoundError(
            f"Process {jax.process_index()} cannot see the token directory {out_dir_str} that process 0 wrote: put "
            "the workdir on a filesystem that every host shares."
        )
    return out_dir


def ensure_token_shards(
    encode_fn: Callable[[np.ndarray], np.ndarray],
    data_cfg: Mapping | DataConfig,
    out_dir: str | os.PathLike,
    *,
    split: str,
    tokenizer: Mapping,
    **kwargs,
) -> tuple[bool, str]:
    """`write_token_shards(...)` unless `out_dir` already holds shards with this key; returns (written, why), e.g.
    (True, "tokens in /w/tokens were written from data.source=digits [train] at 16 px, now ... at 32 px").

    Process 0's look at `out_dir` decides for every process (`broadcast_one_to_all`), so hosts never disagree
    about whether to write (which would leave some waiting at the barrier). With `per_host` (each host's own
    `out_dir`) each host decides for itself and all meet at one barrier at the end. `kwargs` go to
    `write_token_shards`.
    """
    key = token_shards_key(data_cfg, split=split, tokenizer=tokenizer)
    fresh, why = token_shards_match(out_dir, key)
    if kwargs.get("per_host"):
        if not fresh:
            write_token_shards(encode_fn, data_cfg, out_dir, split=split, tokenizer=tokenizer, **kwargs)
        sync_hosts(f"jaxgen.data.ensure_token_shards:{os.fspath(out_dir)}")
        return not fresh, why
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fresh = bool(multihost_utils.broadcast_one_to_all(np.int32(fresh)))
    if not fresh:
        write_token_shards(encode_fn, data_cfg, out_dir, split=split, tokenizer=tokenizer, **kwargs)
    return not fresh, why
