"""The tfds source on a tiny dataset that a real `GeneratorBasedBuilder` writes as array_record (tfds_fixture.py)."""

import ml_collections
import numpy as np
import pytest

import jaxgen.data as data
from jaxgen.data import records
from jaxgen.train.sections import imagenet_data_section
from tests import tfds_fixture
from tests.tfds_fixture import NAME, data_section, example_image, prepare


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("tfds"))


def _ids(images):
    """The example ids (pixel [0, 0, 0]) of float images in [-1, 1]."""
    return np.round((images[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()


def test_unprepared_and_unknown_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{NAME!r} is not prepared in .*file_format='array_record'"):
        data.load_source(data_section(tmp_path / "empty"), "train")
    with pytest.raises(ValueError, match=r"^data\.source\.name='no_such_dataset_xyz': no tfds dataset named"):
        data.load_source(dict(source=dict(kind="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path))), "train")


def test_records_splits_and_batches(data_dir):
    cfg = ml_collections.ConfigDict(data_section(data_dir))  # as the configs hold it
    source = data.load_source(cfg, "train")
    assert len(source) == 12 and source.num_classes == 3 and "tfds:jaxgen_tiny_images/train" in source.description
    seen = set()
    for i in range(len(source)):
        record = source[i]
        example_id = int(record["image"][0, 0, 0])
        np.testing.assert_array_equal(record["image"], example_image("train", example_id))  # lossless, not resized
        assert record["label"].dtype == np.int32 and record["label"] == example_id % 3
        seen.add(example_id)
    assert seen == set(range(12))
    val = data.load_eval_arrays(cfg, cfg.eval_split)
    assert val["image"].shape == (4, 32, 32, 3) and sorted(_ids(val["image"])) == [0, 1, 2, 3]
    assert len(data.load_source(cfg, "train[:50%]")) == 6
    small = data.load_source(data_section(data_dir, image_size=16), "train")[0]["image"]
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    it = data.make_train_iterator(cfg, global_batch_size=4, seed=0, num_classes=3)
    batches = [next(it) for _ in range(3)]
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    assert sorted(np.concatenate([_ids(b["image"]) for b in batches]).tolist()) == list(range(12))  # one epoch
    with pytest.raises(ValueError, match=r"no split 'nope' \(splits: \['test', 'train', 'validation'\]\)"):
        data.load_source(cfg, "nope")


def test_labels_and_class_count_are_checked(data_dir):
    with pytest.raises(data.LabelRangeError, match=r"^tfds:jaxgen_tiny_images/test.*label -1, outside the 3 classes"):
        data.load_eval_arrays(data_section(data_dir), "test")  # unlabeled split, as imagenet2012's test
    with pytest.raises(ValueError, match=r"has 3 classes but the generator has num_classes=2"):
        data.make_train_iterator(data_section(data_dir), global_batch_size=4, seed=0, num_classes=2)


def test_non_rgb_record_is_an_error_and_a_corrupt_one_a_skip(data_dir):
    source = data.load_source(data_section(data_dir), "train")
    rgba = np.zeros((32, 32, 4), np.uint8)
    source._data = [{"image": rgba, "label": 0}, {"image": np.zeros((32, 32, 3), np.float32), "label": 1}]
    with pytest.raises(data.ImageModeError, match=r"tfds:jaxgen_tiny_images/train\[0\]: image mode is 'RGBA'"):
        source[0]
    assert records.keep_record(source[1]) is False  # corrupt: skipped, and counted
    assert "tfds:jaxgen_tiny_images/train[1]" in data.skipped_images()
    converting = data.load_source(data_section(data_dir, convert_to_rgb=True), "train")
    converting._data = [{"image": rgba, "label": 0}]
    assert converting[0]["image"].shape == (32, 32, 3)


def test_imagenet_section_reads_the_tiny_dataset(data_dir):
    """The ImageNet recipes' data section, pointed at the tiny dataset (what a tiny-size recipe run uses)."""
    section = imagenet_data_section(source=data_section(data_dir)["source"], image_size=16, eval_split="validation")
    cfg = data.parse_config(section)
    assert cfg.source.kind == "tfds" and cfg.source.name == tfds_fixture.NAME and cfg.random_flip
    batch = next(data.make_train_iterator(section, global_batch_size=6, seed=1, num_classes=1000))
    assert batch["image"].shape == (6, 16, 16, 3) and batch["label"].max() < 3
