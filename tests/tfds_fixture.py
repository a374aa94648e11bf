"""A tiny real tfds dataset for tests, written locally by a `GeneratorBasedBuilder` (no network, no TensorFlow).

`jaxgen_tiny_images`: 32x32 RGB PNGs, ClassLabel with 3 classes; splits "train" (12), "validation" (4) and
"test" (2, unlabeled: label -1, as in imagenet2012's test split). Example `i` of a split is a flat colour of its
class (red / green / blue) plus noise, with `image[0, 0, 0] == i` (its id in the split) and `label == i % 3`.

    from tests.tfds_fixture import prepare, data_section
    cfg.data = data_section(prepare(tmp_path / "tfds"))  # e.g. configs/var_imagenet.py at tiny size
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

NAME = "jaxgen_tiny_images"
IMAGE_SIZE = 32
NUM_CLASSES = 3
SPLITS = {"train": 12, "validation": 4, "test": 2}
_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.int32)


def example_image(split: str, i: int) -> np.ndarray:
    """uint8 [32, 32, 3]: example `i` of `split` (class colour + noise, pixel [0, 0, 0] = i)."""
    rng = np.random.default_rng([list(SPLITS).index(split), i])
    image = _COLOURS[i % NUM_CLASSES] + rng.integers(-30, 31, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    image[0, 0, 0] = i
    return image


class JaxgenTinyImages(tfds.core.GeneratorBasedBuilder):
    """The builder (registered as `NAME` when this module is imported)."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds looks this up through `importlib_resources` (not installed) for a module in a namespace package
        # (tests/ has no __init__.py); the answer is this file, which has no checksums (nothing is downloaded).
        return epath.Path(__file__)

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            buffer = io.BytesIO()  # encoded bytes: encoding numpy arrays would need TensorFlow
            PIL.Image.fromarray(example_image(split, i)).save(buffer, format="PNG")
            yield i, {"image": buffer.getvalue(), "label": -1 if split == "test" else i % NUM_CLASSES}


def prepare(data_dir: str | os.PathLike) -> str:
    """Writes the dataset into `data_dir` as array_record (once; later calls reuse it); returns `data_dir`."""
    data_dir = os.fspath(data_dir)
    builder = tfds.builder(NAME, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return data_dir


def data_section(data_dir: str | os.PathLike, **overrides) -> dict:
    """A `cfg.data` section reading the prepared dataset (train / validation, 32 px, no flip)."""
    return (
        dict(
            source=dict(kind="tfds", path="", name=NAME, data_dir=os.fspath(data_dir)),
            image_size=IMAGE_SIZE,
            train_split="train",
            eval_split="validation",
            random_flip=False,
            convert_to_rgb=False,
            worker_count=0,
        )
        | overrides
    )
