"""Random-access image sources (grain `RandomAccessDataSource`s): digits, an image folder, a prepared tfds dataset.

A source has `__len__`, `__getitem__`, `num_classes` (0 = unconditional) and `description`; its records are
described in `jaxgen.data.records`. A file that cannot be decoded gives a skip record; an image that is not RGB
with `convert_to_rgb=False` raises `ImageModeError` wherever it sits (it is never skipped). Token sources are in
`jaxgen.data.tokens`; `jaxgen.data.loading.load_source` picks the source a config names.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
from absl import logging

from jaxgen.data import transforms
from jaxgen.data.records import note_skipped, skip_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SPLIT_DIR_NAMES = ("train", "val", "validation", "test", "eval")
_NUM_CHECKED = 8  # images decoded up front by the folder source to catch wrong modes early


# ------------------------------------------------------------------------------------------------------ digits


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """The fixed digits split: within each class (in file order) every 6th image is "test", the rest "train".

    Deterministic without any RNG, stratified, 296 of the 1,797 images in "test" (floor(n_c / 6) of each class).
    int64 [N] sorted indices.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', got split={split!r}.")
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    is_test = rank % 6 == 5
    return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsSource:
    """scikit-learn's bundled `load_digits()`: 1,797 real 8x8 scans (ink 0..16), 10 classes, no download.

    Rendered white digit on black (ink 16 -> 255), upsampled with PIL bicubic to [image_size, image_size],
    grey replicated to RGB uint8.
    """

    def __init__(self, split: str, image_size: int):
        import sklearn.datasets

        digits = sklearn.datasets.load_digits()
        index = digits_split_indices(digits.target, split)
        self._ink = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
        self._labels = digits.target[index].astype(np.int32)
        self._size = image_size
        self.num_classes = 10
        self.description = f"digits[{split}]: {len(index)} sklearn 8x8 scans -> {image_size}px bicubic, 10 classes"

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        grey = PIL.Image.fromarray(self._ink[index]).resize((self._size, self._size), PIL.Image.Resampling.BICUBIC)
        image = np.repeat(np.asarray(grey, dtype=np.uint8)[..., None], 3, axis=-1)
        return {"image": image, "label": self._labels[index]}


# ------------------------------------------------------------------------------------------------------ folder


def _list_images(directory: str) -> list[str]:
    """Sorted image paths (by extension, case-insensitive) under `directory`, recursively, hidden files skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def _folder_root(path: str, split: str) -> str:
    """`path/split` when `path` is organised in split folders (train/, val/, ...), else `path` for every split."""
    split_dirs = [d for d in _SPLIT_DIR_NAMES if os.path.isdir(os.path.join(path, d))]
    if not split_dirs:
        return path
    if not os.path.isdir(os.path.join(path, split)):
        raise FileNotFoundError(
            f"{path} holds split folders {split_dirs} but no {split!r}: set data.train_split / data.eval_split "
            "to one of them."
        )
    return os.path.join(path, split)


class FolderSource:
    """An ImageFolder tree: `root/<class>/**/*.jpg` (class ids = sorted folder names) or flat `root/*.png`
    (unconditional: label 0, num_classes 0). `root` is `path/<split>` if `path` has split folders, else `path`.

    Decodes lazily with PIL: exif orientation, shorter side -> image_size (bicubic), center crop, uint8 [S, S, 3].
    """

    def __init__(self, path: str, split: str, image_size: int, convert_to_rgb: bool):
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"data.source.path={path!r} does not exist or is not a directory: set it to your image folder."
            )
        root = _folder_root(path, split)
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.paths, labels = [], []
        if classes:
            loose = [e.path for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            if loose:
                logging.warning("%s: ignoring %d images outside the class folders, e.g. %s", root, len(loose), loose[0])
            for label, name in enumerate(classes):
                files = _list_images(os.path.join(root, name))
                self.paths += files
                labels += [label] * len(files)
        else:
            self.paths = _list_images(root)
            labels = [0] * len(self.paths)
        if not self.paths:
            raise FileNotFoundError(
                f"No images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {root}. Expected root/<class>/*.jpg "
                "or a flat folder of images."
            )
        self._labels = np.asarray(labels, np.int32)
        self._size = image_size
        self._convert = convert_to_rgb
        self.num_classes = len(classes)
        self.description = f"folder {root}: {len(self.paths)} images, {len(classes)} classes -> {image_size}px"
        self._check_some()

    def _check_some(self) -> None:
        """Decodes a few images spread over the tree: a wrong mode raises now, corrupt files are noted."""
        picks = np.unique(np.linspace(0, len(self.paths) - 1, min(_NUM_CHECKED, len(self.paths))).astype(int))
        errors = {}
        for i in picks:
            try:
                self._read(int(i))
            except transforms.ImageModeError:
                raise
            except Exception as e:
                errors[self.paths[i]] = skip_record(self.paths[i], e)["reason"]
        for path, reason in errors.items():
            note_skipped(path, reason)
        if len(errors) == len(picks):
            path, reason = next(iter(errors.items()))
            raise ValueError(
                f"None of the {len(picks)} images checked in {self.description} decodes, e.g. {path}: {reason}"
            )

    def _read(self, index: int) -> dict:
        image = transforms.load_image_file(self.paths[index], image_size=self._size, convert_to_rgb=self._convert)
        return {"image": image, "label": self._labels[index]}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._read(index)
        except transforms.ImageModeError:
            raise  # a policy error (data.convert_to_rgb), never a skip
        except Exception as e:  # PIL raises many types for bad files: the skip record carries the reason
            return skip_record(self.paths[index], e)


# -------------------------------------------------------------------------------------------------------- tfds


class TfdsSource:
    """A prepared tfds dataset read with `builder.as_data_source` (array_record or parquet; no TensorFlow).

    Uses the `image` feature (resized like the folder source when its size differs) and, if present, a
    ClassLabel `label` feature (else label 0, num_classes 0).
    """

    def __init__(self, name: str, split: str, data_dir: str, image_size: int, convert_to_rgb: bool):
        import tensorflow_datasets as tfds

        where = data_dir or "the tfds default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        prepare = (
            f"Prepare it with `tfds.builder({name!r}, data_dir={data_dir or None!r})"
            ".download_and_prepare(file_format='array_record')` or `tfds build "
            f"{name} --file_format=array_record{' --data_dir=' + data_dir if data_dir else ''}`."
        )
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"data.source.name={name!r}: no tfds dataset named {name!r} is registered or prepared in {where}. "
                "Check the name (tfds.list_builders()) and data.source.data_dir."
            ) from None
        except Exception as e:
            raise ValueError(f"data.source.name={name!r}: tfds could not open it in {where}: {e}") from None
        if not builder.is_prepared():
            raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where}. {prepare}")
        if str(builder.info.file_format.value) not in ("array_record", "parquet"):
            raise ValueError(
                f"tfds dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, which "
                f"has no random access. Re-prepare it in another data_dir with file_format='array_record'. {prepare}"
            )
        features = builder.info.features
        if "image" not in features:
            raise ValueError(f"tfds dataset {name!r} has no 'image' feature (features: {list(features)}).")
        channels = features["image"].shape[-1]
        if channels not in (3, None) and not convert_to_rgb:  # None: any, checked per image
            raise ValueError(
                f"tfds dataset {name!r}: images have {channels} channel(s), not 3. Set data.convert_to_rgb=True "
                "to convert them to RGB."
            )
        try:
            self._data = builder.as_data_source(split=split)
        except Exception as e:
            raise ValueError(
                f"tfds dataset {name!r} has no split {split!r} (splits: {sorted(builder.info.splits)}): {e}"
            ) from None
        label = features["label"] if "label" in features else None
        self.num_classes = int(label.num_classes) if hasattr(label, "num_classes") else 0
        self._name = f"tfds:{name}/{split}"
        self._size = image_size
        self._convert = convert_to_rgb
        self.description = f"{self._name}: {len(self._data)} images, {self.num_classes} classes -> {image_size}px"

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        name = f"{self._name}[{index}]"
        try:
            example = self._data[index]
            image = transforms.array_to_rgb(
                example["image"], image_size=self._size, convert_to_rgb=self._convert, name=name
            )
        except transforms.ImageModeError:
            raise  # a policy error (data.convert_to_rgb), never a skip
        except Exception as e:
            return skip_record(name, e)
        return {"image": image, "label": np.int32(example.get("label", 0) if self.num_classes else 0)}
