"""jaxgen.data: digits / folder / tfds / token sources, the grain train iterator (determinism, resume), eval arrays."""

import json
import os

import grain
import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import jaxgen.data as data
from jaxgen.data import sources

DIGITS = dict(source="digits", image_size=16)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------------------------------ digits


def test_digits_split_is_fixed_disjoint_and_stratified():
    import sklearn.datasets

    labels = sklearn.datasets.load_digits().target
    train, test = sources.digits_split_indices(labels, "train"), sources.digits_split_indices(labels, "test")
    np.testing.assert_array_equal(test, sources.digits_split_indices(labels, "test"))
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    assert len(test) == 296 and test[:5].tolist() == [35, 39, 48, 52, 53]  # frozen: the split never changes
    for split in ("train", "test"):
        source = data.load_source(DIGITS, split)
        assert source.num_classes == 10 and split in source.description
        record = source[0]
        assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
        assert record["label"].dtype == np.int32
        np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 2])  # grey as RGB
        arrays = data.load_eval_arrays(DIGITS, split)
        assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.int32
        assert arrays["image"].shape == (len(source), 16, 16, 3)
        assert arrays["image"].min() == -1.0 and arrays["image"].max() == 1.0
        assert set(arrays["label"].tolist()) == set(range(10))
        assert arrays["image"].mean() < -0.25  # mostly black background, white ink
    with pytest.raises(ValueError, match="'train' and 'test'"):
        data.load_source(DIGITS, "validation")


def test_digits_are_real_digits():
    train, test = data.load_eval_arrays(DIGITS, "train"), data.load_eval_arrays(DIGITS, "test", max_examples=200)
    assert len(test["label"]) == 200
    x_train, x_test = train["image"].reshape(len(train["image"]), -1), test["image"].reshape(200, -1)
    centroids = np.stack([x_train[train["label"] == c].mean(0) for c in range(10)])
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == test["label"]) > 0.8


# ------------------------------------------------------------------------------------------------------ folder


def _save(path, array, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = PIL.Image.fromarray(array)
    image = image.convert(mode, palette=PIL.Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    image.save(path)


def _random_rgb(rng, h=20, w=14):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_folder_classes_and_corrupt_file(tmp_path):
    sources.clear_skipped_images()
    rng = np.random.default_rng(0)
    for name, n in (("cat", 4), ("dog", 5)):
        for i in range(n):
            _save(str(tmp_path / name / f"{i}.{'png' if i % 2 else 'JPG'}"), _random_rgb(rng))
    broken = tmp_path / "dog" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    cfg = dict(source=f"folder:{tmp_path}", image_size=16, random_flip=True)
    source = data.load_source(cfg, "train")
    assert len(source) == 10 and source.num_classes == 2
    it = data.make_train_iterator(cfg, global_batch_size=4, seed=0)
    batches = _batches(it, 6)  # 24 examples: more than two epochs of 9 readable images
    assert all(b["image"].shape == (4, 16, 16, 3) and b["label"].shape == (4,) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    assert set(labels.tolist()) == {0, 1}
    skipped = data.skipped_images()
    assert list(skipped) == [str(broken)] and "UnidentifiedImageError" in skipped[str(broken)]
    assert data.skipped_count() == 1
    arrays = data.load_eval_arrays(cfg, "test")  # no split folders: every split is the whole tree
    assert arrays["image"].shape == (9, 16, 16, 3) and arrays["label"].tolist() == [0] * 4 + [1] * 5


def test_folder_flat_split_folders_and_resize(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 0] = wide[:, 10:20, 1] = wide[:, 20:, 2] = 255  # red | green | blue thirds
    _save(str(tmp_path / "flat" / "a.png"), wide)
    _save(str(tmp_path / "flat" / "b.webp"), wide)
    source = data.load_source(dict(source=f"folder:{tmp_path / 'flat'}", image_size=8), "train")
    assert source.num_classes == 0 and len(source) == 2 and source[1]["label"] == 0
    image = source[0]["image"]
    assert image.shape == (8, 8, 3)  # shorter side 10 -> 8, then the center 8 of 24 columns: the green third
    assert image[:, 2:6, 1].min() > 200 and image[:, 2:6, 0::2].max() < 50
    for split in ("train", "val"):
        _save(str(tmp_path / "split" / split / "x" / "0.png"), wide)
    cfg = dict(source=f"folder:{tmp_path / 'split'}", image_size=8)
    assert len(data.load_source(cfg, "val")) == 1
    with pytest.raises(FileNotFoundError, match="'test'"):
        data.load_source(cfg, "test")


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_folder_non_rgb_is_an_error_unless_converted(tmp_path, mode):
    grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    for i in range(3):
        if mode == "I;16":
            PIL.Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / f"{i}.png")
        else:
            _save(str(tmp_path / f"{i}.png"), np.repeat(grey[..., None], 3, -1), mode)
    assert PIL.Image.open(tmp_path / "0.png").mode == mode
    cfg = dict(source=f"folder:{tmp_path}", image_size=16)
    with pytest.raises(ValueError, match=rf"0\.png.*{mode}.*convert_to_rgb=True"):
        data.load_source(cfg, "train")
    image = data.load_source({**cfg, "convert_to_rgb": True}, "train")[0]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[..., 0], grey, atol=2)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_source(dict(source=f"folder:{tmp_path / 'missing'}"), "train")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No images"):
        data.load_source(dict(source=f"folder:{tmp_path / 'empty'}"), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="None of the 1 images checked"):
        data.load_source(dict(source=f"folder:{tmp_path / 'bad'}"), "train")
    with pytest.raises(ValueError, match=r"Unknown data\.source"):
        data.load_source(dict(source="imagenet"), "train")
    for size in (0, 4, 16.0, "16", True):
        with pytest.raises(ValueError, match="image_size"):
            data.load_source(dict(source="digits", image_size=size), "train")


# -------------------------------------------------------------------------------------------------------- tfds


class JaxgenTestShapes(tfds.core.GeneratorBasedBuilder):
    """A real tfds builder: 12x10 RGB images whose value encodes the example id, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(shape=(12, 10, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 20), "test": self._generate_examples(100, 6)}

    def _generate_examples(self, start, n):
        import io

        for i in range(start, start + n):
            buffer = io.BytesIO()  # encoded bytes: encoding numpy arrays would need TensorFlow
            PIL.Image.fromarray(np.full((12, 10, 3), i, np.uint8)).save(buffer, format="PNG")
            yield i, {"image": buffer.getvalue(), "label": i % 3}


def test_tfds_source(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"not prepared.*file_format='array_record'"):
        data.load_source(dict(source="tfds:jaxgen_test_shapes", data_dir=data_dir), "train")
    tfds.builder("jaxgen_test_shapes", data_dir=data_dir).download_and_prepare(file_format="array_record")
    cfg = dict(source="tfds:jaxgen_test_shapes", data_dir=data_dir, image_size=16)
    source = data.load_source(cfg, "train")
    assert len(source) == 20 and source.num_classes == 3
    record = source[7]
    assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
    assert record["label"] == int(record["image"][0, 0, 0]) % 3
    test = data.load_eval_arrays(cfg, "test")
    assert sorted(np.round((test["image"][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()) == list(range(100, 106))
    assert len(data.load_source(cfg, "train[:50%]")) == 10
    batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 16, 16, 3)
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load_source(cfg, "validation")
    with pytest.raises(ValueError, match="no tfds dataset named 'no_such_dataset_xyz'"):
        data.load_source(dict(source="tfds:no_such_dataset_xyz", data_dir=data_dir), "train")


# ------------------------------------------------------------------------------------------------------ tokens


def test_token_shards_roundtrip(tmp_path):
    calls = []

    def encode(images):
        calls.append(images.shape)
        return np.round((images[:, ::4, ::4, 0] + 1) * 3).reshape(len(images), -1).astype(np.int64)

    out = tmp_path / "tok"
    meta = {"tokenizer_step": 7, "tokenizer": {"codebook": 8}}
    assert data.write_token_shards(encode, DIGITS, out, split="test", shard_size=100, metadata=meta) == out
    assert calls == [(64, 16, 16, 3)] * 5  # 296 images: the last batch is padded to 64
    meta = data.read_token_metadata(out)
    assert meta["num_examples"] == 296 and meta["seq_len"] == 16 and meta["num_classes"] == 10
    assert meta["tokenizer_step"] == 7 and meta["tokenizer"] == {"codebook": 8} and len(meta["shards"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary directory left behind
    images = data.load_eval_arrays(DIGITS, "test")
    cfg = dict(source=f"tokens:{out}")
    back = data.load_eval_arrays(cfg, "test")
    np.testing.assert_array_equal(back["tokens"], encode(images["image"]))
    np.testing.assert_array_equal(back["label"], images["label"])
    source = data.load_source(cfg, "test")
    assert source.num_classes == 10 and source[3]["tokens"].dtype == np.int32
    batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0, split="test"))
    assert batch.keys() == {"tokens", "label"}
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match="holds split 'test', not 'train'"):
        data.load_source(cfg, "train")
    with pytest.raises(ValueError, match="random_flip"):
        data.make_train_iterator({**cfg, "random_flip": True}, global_batch_size=8, seed=0, split="test")
    # Rewriting replaces the directory; a half-written one (no meta.json) is never taken for a token directory.
    data.write_token_shards(lambda x: encode(x)[:, :4], DIGITS, out, split="test", metadata={"tokenizer_step": 8})
    assert data.read_token_metadata(out)["seq_len"] == 4 and sorted(os.listdir(tmp_path)) == ["tok"]
    (tmp_path / "half").mkdir()
    np.save(tmp_path / "half" / "tokens-00000.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(FileNotFoundError, match="not a complete token directory"):
        data.load_source(dict(source=f"tokens:{tmp_path / 'half'}"), "test")
    with pytest.raises(ValueError, match="not a token directory"):
        data.write_token_shards(encode, DIGITS, tmp_path / "half", split="test")
    with pytest.raises(ValueError, match="reserved"):
        data.write_token_shards(encode, DIGITS, out, split="test", metadata={"seq_len": 3})


# ---------------------------------------------------------------------------------------------------- iterator


def test_iterator_determinism_epochs_and_resume():
    cfg = {**DIGITS, "random_flip": True}
    first = _batches(data.make_train_iterator(cfg, global_batch_size=16, seed=0), 4)
    _assert_same(first, _batches(data.make_train_iterator(cfg, global_batch_size=16, seed=0), 4))
    other = _batches(data.make_train_iterator(cfg, global_batch_size=16, seed=1), 1)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    # One batch per epoch: each epoch is a new permutation of the same examples.
    epoch_a, epoch_b = _batches(data.make_train_iterator(DIGITS, global_batch_size=1501, seed=0), 2)
    assert not np.array_equal(epoch_a["label"], epoch_b["label"])
    np.testing.assert_array_equal(np.sort(epoch_a["label"]), np.sort(epoch_b["label"]))
    # Resume from get_state() after k batches.
    it = data.make_train_iterator(cfg, global_batch_size=16, seed=0)
    _batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _batches(it, 3)
    resumed = data.make_train_iterator(cfg, global_batch_size=16, seed=0)
    resumed.set_state(state)
    _assert_same(expected, _batches(resumed, 3))


def test_iterator_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    it = data.make_train_iterator(DIGITS, global_batch_size=8, seed=5)
    _batches(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        expected = _batches(it, 2)  # advancing right after save() must not change what was saved
        manager.wait_until_finished()
        fresh = data.make_train_iterator(DIGITS, global_batch_size=8, seed=5)
        restored = manager.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(expected, _batches(restored["data_iter"], 2))


def test_iterator_shards_per_host(monkeypatch):
    train = data.load_eval_arrays(DIGITS, "train")["image"].reshape(1501, -1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    batch = next(data.make_train_iterator(DIGITS, global_batch_size=8, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3)
    distance = ((batch["image"].reshape(4, 1, -1) - train[None, 750:1500]) ** 2).sum(-1)
    assert distance.min(axis=1).max() == 0  # every example comes from this host's half
    with pytest.raises(ValueError, match=r"multiple of jax\.process_count"):
        data.make_train_iterator(DIGITS, global_batch_size=7, seed=0)
    with pytest.raises(ValueError, match="larger than the dataset"):
        data.make_train_iterator(DIGITS, global_batch_size=1502, seed=0)
    with pytest.raises(ValueError, match="seed"):
        data.make_train_iterator(DIGITS, global_batch_size=8, seed=-1)


def test_iterator_with_worker_processes():
    cfg = {**DIGITS, "random_flip": True}
    it = data.make_train_iterator({**cfg, "worker_count": 1}, global_batch_size=8, seed=0)
    try:
        _assert_same(_batches(it, 3), _batches(data.make_train_iterator(cfg, global_batch_size=8, seed=0), 3))
        assert json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
