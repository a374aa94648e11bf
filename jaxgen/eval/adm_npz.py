"""The ADM evaluator's npz format (openai/guided-diffusion `evaluations/evaluator.py`), both directions.

A sample or reference batch is an npz (a zip of .npy members):

    arr_0                uint8 [N, H, W, 3]  RGB images, 0..255; ADM streams it in batches of 64 from the zip member
    arr_1                int64 [N]           class labels (ADM's sample scripts write them; the evaluator ignores them)
    mu, sigma            [2048], [2048, 2048]  optional precomputed pool statistics (reference batches)
    mu_s, sigma_s        [2023], [2023, 2023]  the same for the spatial (sFID) features; ADM uses them instead of
                                               the statistics of arr_0's images

    write_npz(path, images_u8, labels)          np.savez (uncompressed, streamable), atomically
    write_npz_stream(path, batches, n, (H, W, 3), labels)   the same, one batch in memory at a time
    NpzImages(path).iter_batches(64)            uint8 batches straight from the zip member (never the whole array)
    read_stats(path)                            the statistics present, float64
    open_reference_images(path)                 arr_0 of a reference batch, None if it has only statistics
    read_reference(path)                        (images or None, statistics); neither is an error
    open_samples(path)                          an .npz, a directory of chunk .npz files, or of PNG / JPEG images

Shapes and dtypes are checked from the .npy header before any image byte is read; every problem is a ValueError of
one line that says what was given and what to do.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REFERENCE_EXAMPLE = "VIRTUAL_imagenet256_labeled.npz"


# ---- checks ---------------------------------------------------------------------------------------------------------


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def check_layout(shape: tuple[int, ...], dtype: Any, where: str) -> None:
    """Raise a one-line ValueError unless (shape, dtype) is ADM's uint8 [N, H, W, 3] with H, W >= 1; the message
    names `where` (e.g. "samples.npz arr_0"), what was given, and the numpy expression that fixes it."""
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    given = f"images in {where} are {dtype} {_shape_text(shape)}"
    want = "the ADM format wants uint8 [N,H,W,3] (RGB, channels last)"
    if len(shape) == 3:
        raise ValueError(
            f"{given}; {want}: grayscale [N,H,W] -> repeat to 3 channels: np.repeat(x[..., None], 3, axis=-1) "
            f"(one [H,W,3] image -> x[None])"
        )
    if len(shape) != 4:
        raise ValueError(f"{given}; {want}")
    if shape[-1] == 1:
        raise ValueError(f"{given}; {want}: grayscale [N,H,W,1] -> repeat to 3 channels: np.repeat(x, 3, axis=-1)")
    if shape[1] == 3 and shape[-1] != 3:
        raise ValueError(f"{given}, which looks like NCHW; {want}: transpose it with x.transpose(0, 2, 3, 1)")
    if shape[-1] == 4:
        raise ValueError(f"{given}, which looks like RGBA; {want}: drop the alpha channel with x[..., :3]")
    if shape[-1] != 3:
        raise ValueError(f"{given}; {want}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"{given}: the images are empty (H and W must be >= 1)")
    if dtype != np.uint8:
        if np.issubdtype(dtype, np.floating):
            fix = "for floats in [0, 1], np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            fix = "np.clip(x, 0, 255).astype(np.uint8) (after checking the range is 0..255)"
        else:
            fix = "convert them to uint8 0..255"
        raise ValueError(f"{given}; the ADM format wants uint8 0..255: {fix}")


def check_images(x: Any, where: str) -> np.ndarray:
    """`x` as a numpy array if it is ADM's uint8 [N, H, W, 3] (N may be 0), else a one-line ValueError
    (`check_layout`)."""
    x = np.asarray(x)
    check_layout(x.shape, x.dtype, where)
    return x


def float_to_uint8(images01: Any) -> np.ndarray:
    """Float images in [0, 1] -> uint8 0..255 (round to nearest, clip), as ADM's sample scripts do."""
    return np.clip(np.round(np.asarray(images01, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _check_labels(labels: Any, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(
            f"labels for {where} are {labels.dtype} {_shape_text(labels.shape)}; want one integer class per image: "
            f"[{n}]"
        )
    return labels.astype(np.int64)


def _check_stats(stats: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """The statistics as float64 arrays, checked: known keys, mu 1-D, sigma square of mu's length, in pairs."""
    unknown = sorted(set(stats) - set(STAT_KEYS))
    if unknown:
        raise ValueError(f"statistics for {where}: unknown keys {unknown}; the ADM keys are {list(STAT_KEYS)}")
    out = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    for mu_key, sigma_key in STAT_PAIRS:
        if (mu_key in out) != (sigma_key in out):
            have, lack = (mu_key, sigma_key) if mu_key in out else (sigma_key, mu_key)
            raise ValueError(f"{where} has {have} but no {lack}: ADM reads them as a pair; give both or neither")
        if mu_key not in out:
            continue
        mu, sigma = out[mu_key], out[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(
                f"{where}: {mu_key} is {_shape_text(mu.shape)} and {sigma_key} {_shape_text(sigma.shape)}; want a "
                f"mean [D] and a covariance [D,D] (D = 2048 for mu/sigma, 2023 for mu_s/sigma_s)"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{where}: {mu_key}/{sigma_key} hold NaN or inf values; recompute the statistics")
    return out


# ---- writing --------------------------------------------------------------------------------------------------------


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(file)` into a hidden temporary file beside `path` (created with the umask's permissions), flushed to
    disk, then renamed over `path`: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_npz(
    path: str | Path,
    images_u8: Any,
    labels: Any = None,
    *,
    stats: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an ADM batch: `arr_0` = images uint8 [N, H, W, 3], `arr_1` = labels as int64 [N] (if given), and the
    statistics `mu`, `sigma`, `mu_s`, `sigma_s` (float64; whichever `stats` has). `extra`: more named arrays (ADM
    ignores them). `np.savez`, uncompressed like ADM's sample scripts (so arr_0 streams), written atomically."""
    path = Path(path)
    images = check_images(images_u8, str(path))
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = _check_labels(labels, len(images), str(path))
    if stats:
        arrays.update(_check_stats(stats, str(path)))
    for name, value in (extra or {}).items():
        if name in arrays or name in STAT_KEYS or name in ("arr_0", "arr_1"):
            raise ValueError(f"write_npz({path}): extra array name {name!r} is one of the ADM keys")
        arrays[name] = np.asarray(value)
    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def write_npz_stream(
    path: str | Path,
    batches: Iterable[Any],
    num_images: int,
    image_shape: tuple[int, int, int],
    labels: Any = None,
) -> Path:
    """Write an ADM batch whose `arr_0` [num_images, *image_shape] arrives in `batches` (uint8 [b, H, W, 3] each),
    holding one batch in memory: the .npy header for the full shape, then each batch's bytes appended to an
    uncompressed zip64 member; `arr_1` = labels (int64, if given). Readable by `np.load` and ADM; atomic."""
    path = Path(path)
    shape = (int(num_images), *(int(s) for s in image_shape))
    check_layout(shape, np.uint8, str(path))
    label_arr = None if labels is None else _check_labels(labels, shape[0], str(path))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                done = 0
                for batch in batches:
                    batch = check_images(batch, f"a batch for {path}")
                    if batch.shape[1:] != shape[1:] or done + len(batch) > shape[0]:
                        raise ValueError(
                            f"write_npz_stream({path}): a batch of {_shape_text(batch.shape)} after {done} images "
                            f"does not fit arr_0 {_shape_text(shape)}"
                        )
                    member.write(np.ascontiguousarray(batch).data)
                    done += len(batch)
                if done != shape[0]:
                    raise ValueError(f"write_npz_stream({path}): got {done} images, arr_0 needs {shape[0]}")
            if label_arr is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, label_arr, allow_pickle=False)

    return _atomic_write(path, write)


# ---- reading --------------------------------------------------------------------------------------------------------


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(
            f"{path} is not a readable npz file ({e}: truncated, or another format); an ADM batch is an np.savez "
            f"archive"
        ) from None


def _npz_keys(zf: zipfile.ZipFile) -> list[str]:
    return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _read_npy_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, leaving it at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise ValueError(f"{where} is not a readable .npy array ({e})") from None
    raise ValueError(f"{where} is a .npy of format version {version}; write it again with np.savez (version 1.0)")


def _read_member(path: Path, key: str) -> np.ndarray | None:
    """The array `key` of the npz at `path`, or None when it has none."""
    with _open_zip(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            return None
        with zf.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)


class NpzImages:
    """The images `arr_0` of an ADM npz, streamed: `.num_images`, `.shape` (H, W, 3), `.iter_batches(64)`,
    `.labels` (arr_1 or None). Opening reads only the zip directory and the .npy header: dtype, layout and the
    member's size are checked there (Fortran order, float, NCHW, grayscale and truncated files are errors)."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        self.where = f"{self.path} {key}"
        with _open_zip(self.path) as zf:
            if f"{key}.npy" not in zf.namelist():
                keys = _npz_keys(zf)
                raise ValueError(
                    f"{self.path} has no {key} (its arrays: {keys or 'none'}); an ADM batch keeps its images uint8 "
                    f"[N,H,W,3] in arr_0, as np.savez(path, images) writes"
                )
            info = zf.getinfo(f"{key}.npy")
            self.keys = _npz_keys(zf)
            with zf.open(info) as f:
                shape, fortran_order, dtype = _read_npy_header(f, self.where)
                data_offset = f.tell()
        if fortran_order:
            raise ValueError(
                f"{self.where} is stored in Fortran order; ADM streams C-order rows: write it again with "
                f"np.savez(path, np.ascontiguousarray(x))"
            )
        check_layout(shape, dtype, self.where)
        self.num_images = int(shape[0])
        self.shape = tuple(int(s) for s in shape[1:])
        self._image_bytes = math.prod(self.shape)
        data_bytes = info.file_size - data_offset
        if data_bytes != self.num_images * self._image_bytes:
            raise ValueError(
                f"{self.where} is truncated or damaged: its header says {_shape_text(shape)} uint8 = "
                f"{self.num_images * self._image_bytes} bytes, the zip member holds {data_bytes}; write it again"
            )

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"NpzImages({str(self.path)!r}: {self.num_images} x {_shape_text(self.shape)} uint8)"

    def array(self, key: str) -> np.ndarray | None:
        """Another array of the file (e.g. `arr_1`), read whole, or None when there is none."""
        return _read_member(self.path, key) if key in self.keys else None

    @property
    def labels(self) -> np.ndarray | None:
        """`arr_1` (the class labels ADM's sample scripts write), or None."""
        labels = self.array("arr_1")
        return None if labels is None else _check_labels(labels, self.num_images, f"{self.path} arr_1")

    def iter_batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches in order (b = batch_size, the last one shorter), read from the zip member's
        stream (decompressed on the fly for np.savez_compressed files): one batch in memory at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
                _read_npy_header(f, self.where)
                for start in range(0, self.num_images, batch_size):
                    out = np.empty((min(batch_size, self.num_images - start), *self.shape), np.uint8)
                    view, pos = memoryview(out.reshape(-1)), 0
                    while pos < len(view):
                        got = f.readinto(view[pos:])
                        if not got:
                            raise EOFError(f"the data ends after {start * self._image_bytes + pos} bytes")
                        pos += got
                    yield out
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"{self.where} is damaged ({e}); write it again") from None


def read_stats(path: str | Path) -> dict[str, np.ndarray]:
    """Whichever of `mu`, `sigma`, `mu_s`, `sigma_s` the npz holds, as float64 (checked: shapes, pairs, finite)."""
    path = Path(path)
    with _open_zip(path) as zf:
        keys = [k for k in STAT_KEYS if f"{k}.npy" in zf.namelist()]
    return _check_stats({k: _read_member(path, k) for k in keys}, str(path))


def open_reference_images(path: str | Path) -> NpzImages | None:
    """The arr_0 images of an ADM reference batch, or None when it holds only statistics (mu / sigma / mu_s /
    sigma_s); an npz with neither is a one-line ValueError. Reads only the zip directory (and arr_0's header)."""
    path = Path(path)
    with _open_zip(path) as zf:
        keys = _npz_keys(zf)
    if "arr_0" in keys:
        return NpzImages(path)
    if not any(k in keys for k in STAT_KEYS):
        raise ValueError(
            f"{path.name} has neither arr_0 images nor mu/sigma statistics (its arrays: {keys or 'none'}): pass an "
            f"ADM reference batch such as {REFERENCE_EXAMPLE}"
        )
    return None


def read_reference(path: str | Path) -> tuple[NpzImages | None, dict[str, np.ndarray]]:
    """(arr_0 images or None, precomputed statistics) of an ADM reference batch; an npz with neither is an error."""
    images = open_reference_images(path)
    return images, read_stats(path)


def rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Batches of any sizes -> batches of exactly `batch_size` (the last one shorter), in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[np.ndarray] = []
    have = 0
    for x in batches:
        while len(x):
            take = min(batch_size - have, len(x))
            pending.append(x[:take])
            have, x = have + take, x[take:]
            if have == batch_size:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have = [], 0
    if have:
        yield np.concatenate(pending)


class NpzChunks:
    """The chunk files (`*.npz`, in name order) of a directory as one image set (what `jaxgen.sample --num_samples`
    writes under `workdir/samples`): `.num_images`, `.shape`, `.iter_batches(bs)`, `.labels`."""

    def __init__(self, files: list[Path]):
        self.parts = [NpzImages(p) for p in files]
        self.where = str(files[0].parent)
        self.shape = self.parts[0].shape
        for part in self.parts:
            if part.shape != self.shape:
                raise ValueError(
                    f"{part.path} holds {_shape_text(part.shape)} images but {self.parts[0].path.name} "
                    f"{_shape_text(self.shape)}: all files in {self.where} must have the same image size"
                )
        self.num_images = sum(p.num_images for p in self.parts)

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> np.ndarray | None:
        labels = [p.labels for p in self.parts]
        return None if any(x is None for x in labels) else np.concatenate(labels)

    def iter_batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        return rebatch((b for p in self.parts for b in p.iter_batches(batch_size)), batch_size)


class ImageFiles:
    """PNG / JPEG files (in name order) as one image set, read with PIL and converted to RGB uint8; all must have
    the same size (checked from the file headers when opened). `.labels` is None."""

    def __init__(self, files: list[Path]):
        from PIL import Image

        self.files = files
        self.where = str(files[0].parent)
        sizes = {}
        for p in files:
            try:
                with Image.open(p) as im:
                    sizes.setdefault(im.size, p)
            except OSError as e:
                raise ValueError(f"{p} is not a readable image ({e}); remove it or replace it") from None
            if len(sizes) > 1:
                (w0, h0), first = next(iter(sizes.items()))
                raise ValueError(
                    f"{p} is {im.size[0]}x{im.size[1]} (W x H) but {first.name} is {w0}x{h0}: all images in "
                    f"{self.where} must have the same size (resize or crop them first)"
                )
        (w, h), _ = next(iter(sizes.items()))
        self.shape = (h, w, 3)
        self.num_images = len(files)
        self.labels = None

    def __len__(self) -> int:
        return self.num_images

    def iter_batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        from PIL import Image

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.num_images, batch_size):
            out = np.empty((min(batch_size, self.num_images - start), *self.shape), np.uint8)
            for i, p in enumerate(self.files[start : start + len(out)]):
                with Image.open(p) as im:
                    rgb = np.asarray(im.convert("RGB"))
                if rgb.shape != self.shape:
                    raise ValueError(f"{p} changed since it was opened: it is {_shape_text(rgb.shape)} now")
                out[i] = rgb
            yield out


def open_samples(path: str | Path) -> NpzImages | NpzChunks | ImageFiles:
    """An image set with `.num_images`, `.shape` (H, W, 3), `.iter_batches(bs)` and `.labels`: an ADM `.npz`
    (arr_0), a directory of `.npz` chunk files (name order), or a directory of PNG / JPEG images (name order). Hidden
    files (a `.name`, e.g. a temporary file of an atomic write) are skipped; subdirectories are not searched."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass an ADM .npz or a directory of .npz chunks or images")
    if not path.is_dir():
        return NpzImages(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    npz = [p for p in files if p.suffix.lower() == ".npz"]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if npz and images:
        raise ValueError(
            f"{path} holds both .npz files ({len(npz)}) and images ({len(images)}): point at a directory of one kind"
        )
    if npz:
        return NpzChunks(npz)
    if images:
        return ImageFiles(images)
    raise ValueError(
        f"{path} holds no .npz files and no PNG/JPEG images (subdirectories are not searched): pass an ADM .npz, a "
        f"directory of .npz chunks (jaxgen.sample --num_samples writes WORKDIR/samples) or of images"
    )
