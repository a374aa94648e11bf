"""jaxgen.data: config, digits / folder / token sources, labels, keyed token shards, the grain iterator, eval arrays.

tfds: tests/test_tfds_source.py.
"""

import functools
import json
import os

import grain
import jax
import numpy as np
import PIL.Image
import pytest

import jaxgen.data as data
from jaxgen.data import pipeline, pretokenize, records, sources

DIGITS = dict(source=dict(kind="digits"), image_size=16)
TOKENIZER = {"config": {"codebook": 8}, "params": "0" * 64}


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


def _folder(path):
    return dict(kind="folder", path=str(path))


def _random_rgb(rng, h=20, w=14):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_folder_classes_and_corrupt_file(tmp_path):
    records.clear_skipped_images()
    rng = np.random.default_rng(0)
    for name, n in (("cat", 4), ("dog", 5)):
        for i in range(n):
            _save(str(tmp_path / name / f"{i}.{'png' if i % 2 else 'JPG'}"), _random_rgb(rng))
    broken = tmp_path / "dog" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    cfg = dict(source=dict(kind="folder", path=str(tmp_path)), image_size=16, random_flip=True)
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
    source = data.load_source(dict(source=_folder(tmp_path / "flat"), image_size=8), "train")
    assert source.num_classes == 0 and len(source) == 2 and source[1]["label"] == 0
    image = source[0]["image"]
    assert image.shape == (8, 8, 3)  # shorter side 10 -> 8, then the center 8 of 24 columns: the green third
    assert image[:, 2:6, 1].min() > 200 and image[:, 2:6, 0::2].max() < 50
    for split in ("train", "val"):
        _save(str(tmp_path / "split" / split / "x" / "0.png"), wide)
    cfg = dict(source=_folder(tmp_path / "split"), image_size=8)
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
    cfg = dict(source=_folder(tmp_path), image_size=16)
    with pytest.raises(ValueError, match=rf"0\.png.*{mode}.*convert_to_rgb=True"):
        data.load_source(cfg, "train")
    image = data.load_source({**cfg, "convert_to_rgb": True}, "train")[0]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[..., 0], grey, atol=2)


def test_grey_image_deep_in_a_folder_is_an_error_unless_converted(tmp_path):
    """Only a few images are decoded up front; a grey one further in must still be an error, never a skip."""
    records.clear_skipped_images()
    rng = np.random.default_rng(0)
    for i in range(25):
        _save(str(tmp_path / f"{i:02d}.png"), _random_rgb(rng), "L" if i == 19 else "RGB")
    cfg = dict(source=_folder(tmp_path), image_size=16)
    source = data.load_source(cfg, "train")  # 19.png is not among the images checked here
    assert len(source) == 25
    with pytest.raises(data.ImageModeError, match=r"19\.png.*'L'.*convert_to_rgb=True"):
        source[19]
    with pytest.raises(data.ImageModeError, match=r"19\.png"):
        data.load_eval_arrays(cfg, "train")
    it = data.make_train_iterator(cfg, global_batch_size=5, seed=0)
    with pytest.raises(data.ImageModeError, match=r"19\.png"):
        _batches(it, 5)  # one epoch
    assert data.skipped_count() == 0  # never a skip record
    arrays = data.load_eval_arrays({**cfg, "convert_to_rgb": True}, "train")
    assert arrays["image"].shape == (25, 16, 16, 3) and data.skipped_count() == 0
    np.testing.assert_array_equal(arrays["image"][19, ..., 0], arrays["image"][19, ..., 2])  # grey as RGB


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.source\.path=.*missing.*does not exist"):
        data.load_source(dict(source=_folder(tmp_path / "missing")), "train")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No images"):
        data.load_source(dict(source=_folder(tmp_path / "empty")), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="None of the 1 images checked"):
        data.load_source(dict(source=_folder(tmp_path / "bad")), "train")
    for size in (0, 4, 16.0, "16", True):
        with pytest.raises(ValueError, match="image_size"):
            data.load_source(dict(source=dict(kind="digits"), image_size=size), "train")


@pytest.mark.parametrize(
    "section, message",
    [
        (dict(source=dict(kind="imagenet")), r"^data\.source\.kind='imagenet' is not a source kind: use 'digits', "),
        (dict(source=dict(kind="folder")), r"^data\.source\.path is empty: data\.source\.kind='folder' needs"),
        (dict(source=dict(kind="tokens", path="")), r"^data\.source\.path is empty: .*'tokens'"),
        (dict(source=dict(kind="tfds", data_dir="/x")), r"^data\.source\.name is empty: .*'imagenet2012'"),
        (dict(source=dict(kind="digits", path="/x")), r"^data\.source\.path='/x' has no meaning for .*'digits'"),
        (dict(source=dict(kind="folder", path="/x", data_dir="/y")), r"^data\.source\.data_dir='/y' has no meaning"),
        (dict(source=dict(kind="digits", pth="/x")), r"^data\.source\.pth is not a data\.source field \(known: kind"),
        (dict(image_sise=16), r"^data\.image_sise is not a data field \(known: source, image_size"),
        (dict(data_dir="/x"), r"^data\.data_dir is not a data field"),  # moved into data.source
        (dict(source="folder:/x"), r"^data\.source='folder:/x' is the old string form: write data\.source=dict\("),
        (dict(source=dict(kind="digits", path=3)), r"^data\.source\.path must be a string"),
        (dict(random_flip="yes"), r"^data\.random_flip must be True or False"),
        (dict(eval_split=""), r"^data\.eval_split must be a non-empty split name"),
    ],
)
def test_config_errors_name_the_field(section, message):
    with pytest.raises(ValueError, match=message) as error:
        data.parse_config(section)
    assert "\n" not in str(error.value)


def test_config_sections_and_ml_collections():
    import ml_collections

    from jaxgen.train.sections import digits_data_section, imagenet_data_section

    cfg = ml_collections.ConfigDict({"data": digits_data_section()})
    cfg.lock()
    parsed = data.parse_config(cfg.data)
    assert parsed.source == data.SourceConfig(kind="digits") and parsed.image_size == 16
    cfg.data.source.kind, cfg.data.source.path = "folder", "~/images"  # what --config.data.source.* overrides do
    assert data.parse_config(cfg.data).source.path == os.path.expanduser("~/images")
    imagenet = data.parse_config(imagenet_data_section())
    assert imagenet.source == data.SourceConfig(kind="tfds", name="imagenet2012")
    assert (imagenet.image_size, imagenet.train_split, imagenet.eval_split) == (256, "train", "validation")
    assert imagenet.random_flip and data.parse_config(imagenet_data_section(image_size=64)).image_size == 64
    tokens = data.with_source(cfg.data, kind="tokens", path="/w/tokens")
    assert tokens.source == data.SourceConfig(kind="tokens", path="/w/tokens") and tokens.image_size == 16


# ------------------------------------------------------------------------------------------------------ labels


class _FakeSource:
    """An image source with 10 classes whose record `bad_index` carries `bad_label`."""

    def __init__(self, bad_index, bad_label, n=40):
        self.num_classes, self.description, self._n = 10, "fake[train]: 40 images, 10 classes", n
        self._bad = bad_index, bad_label

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        label = self._bad[1] if i == self._bad[0] else i % 10
        return {"image": np.full((8, 8, 3), i, np.uint8), "label": np.int32(label)}


@pytest.mark.parametrize("bad_label", [10, 11, -1])
def test_labels_outside_the_classes_are_an_error(monkeypatch, bad_label):
    monkeypatch.setattr(pipeline, "load_source", lambda cfg, split: _FakeSource(17, bad_label))
    good = _FakeSource(-1, 0)
    assert len(list(pipeline.ordered_batches(good, 8))) == 5  # in range: passes
    it = data.make_train_iterator(DIGITS, global_batch_size=8, seed=0)
    with pytest.raises(data.LabelRangeError, match=rf"^fake\[train\].*label {bad_label}, outside the 10 classes"):
        _batches(it, 5)  # one epoch meets record 17
    with pytest.raises(data.LabelRangeError, match=rf"label {bad_label}"):
        data.load_eval_arrays(DIGITS, "train")


def test_more_dataset_classes_than_the_generator_is_refused():
    message = r"digits\[train\].*has 10 classes but the generator has num_classes=5: set the generator's"
    with pytest.raises(ValueError, match=message):
        data.make_train_iterator(DIGITS, global_batch_size=8, seed=0, num_classes=5)
    with pytest.raises(ValueError, match=r"10 classes but the generator has num_classes=9"):
        data.load_eval_arrays(DIGITS, "test", num_classes=9)
    assert next(data.make_train_iterator(DIGITS, global_batch_size=8, seed=0, num_classes=10))["label"].max() < 10
    assert len(data.load_eval_arrays(DIGITS, "test", max_examples=4, num_classes=1000)["label"]) == 4


# ------------------------------------------------------------------------------------------------------ tokens


def _encode(images):
    return np.round((images[:, ::4, ::4, 0] + 1) * 3).reshape(len(images), -1).astype(np.int64)


def test_token_shards_roundtrip(tmp_path):
    calls = []

    def encode(images):
        calls.append(images.shape)
        return _encode(images)

    out = tmp_path / "tok"
    meta = {"tokenizer_step": 7}
    written = data.write_token_shards(
        encode, DIGITS, out, split="test", tokenizer=TOKENIZER, shard_size=100, metadata=meta
    )
    assert written == out
    assert calls == [(64, 16, 16, 3)] * 5  # 296 images: the last batch is padded to 64
    meta = data.read_token_metadata(out)
    assert meta["num_examples"] == 296 and meta["seq_len"] == 16 and meta["num_classes"] == 10
    assert meta["tokenizer_step"] == 7 and meta["key"]["tokenizer"] == TOKENIZER and len(meta["shards"]) == 3
    assert meta["source"] == {"kind": "digits"}
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary directory left behind
    images = data.load_eval_arrays(DIGITS, "test")
    cfg = dict(source=dict(kind="tokens", path=str(out)))
    back = data.load_eval_arrays(cfg, "test")
    np.testing.assert_array_equal(back["tokens"], _encode(images["image"]))
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
    data.write_token_shards(lambda x: _encode(x)[:, :4], DIGITS, out, split="test", tokenizer=TOKENIZER)
    assert data.read_token_metadata(out)["seq_len"] == 4 and sorted(os.listdir(tmp_path)) == ["tok"]
    (tmp_path / "half").mkdir()
    np.save(tmp_path / "half" / "tokens-00000.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(FileNotFoundError, match="not a complete token directory"):
        data.load_source(dict(source=dict(kind="tokens", path=str(tmp_path / "half"))), "test")
    with pytest.raises(ValueError, match="not a token directory"):
        data.write_token_shards(_encode, DIGITS, tmp_path / "half", split="test", tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="reserved"):
        data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer=TOKENIZER, metadata={"key": 3})
    with pytest.raises(ValueError, match="tokenizer must be a non-empty dict"):
        data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer={})
    # A label outside the classes in the shards is refused when they are opened.
    labels = np.load(out / "labels-00000.npy")
    labels[5] = 10
    np.save(out / "labels-00000.npy", labels)
    with pytest.raises(data.LabelRangeError, match=r"tokens .*tok \[test\].*label 10, outside the 10 classes"):
        data.load_source(cfg, "test")


def test_token_shards_are_keyed_by_source_split_size_and_tokenizer(tmp_path):
    out = tmp_path / "tokens"
    ok, why = data.token_shards_match(out, {})
    assert not ok and why == f"no complete token directory at {out}"
    params = {"enc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
    tokenizer = {"config": {"vocab_size": 8}, "params": data.params_fingerprint(params)}
    key = data.token_shards_key(DIGITS, split="test", tokenizer=tokenizer)
    data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer=tokenizer)
    assert data.read_token_metadata(out)["key"] == key
    assert data.token_shards_match(out, key) == (
        True,
        f"tokens in {out} match (data.source=digits [test] at 16 px, same tokenizer)",
    )
    folder = dict(source=_folder(tmp_path / "x"), image_size=32)
    ok, why = data.token_shards_match(out, data.token_shards_key(folder, split="test", tokenizer=tokenizer))
    assert not ok
    assert why == (
        f"tokens in {out} were written from data.source=digits [test] at 16 px, now data.source=folder "
        f"{tmp_path / 'x'} [test] at 32 px"
    )
    ok, why = data.token_shards_match(out, data.token_shards_key(DIGITS, split="train", tokenizer=tokenizer))
    assert not ok and "[test] at 16 px, now data.source=digits [train] at 16 px" in why
    changed = {"enc": {**params["enc"], "bias": np.full(3, 1e-3, np.float32)}}
    new_tok = {**tokenizer, "params": data.params_fingerprint(changed)}
    ok, why = data.token_shards_match(out, data.token_shards_key(DIGITS, split="test", tokenizer=new_tok))
    assert not ok and why.startswith(f"tokens in {out} were written by another tokenizer (tokenizer.params: ")
    bigger = {**tokenizer, "config": {"vocab_size": 16}}
    ok, why = data.token_shards_match(out, data.token_shards_key(DIGITS, split="test", tokenizer=bigger))
    assert not ok and why.endswith("(tokenizer.config.vocab_size: 8 -> 16)")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": "jaxgen.tokens/1"}))
    assert data.token_shards_match(out, key) == (
        False,
        f"tokens in {out} are not in the current format jaxgen.tokens/2",
    )


def test_params_fingerprint():
    import jax.numpy as jnp
    from flax.core import FrozenDict

    tree = {"b": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "a": np.zeros(2, np.int32)}
    fp = data.params_fingerprint(tree)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert (
        data.params_fingerprint(FrozenDict({"a": jnp.zeros(2, jnp.int32), "b": {"w": jnp.asarray(tree["b"]["w"])}}))
        == fp
    )
    one_ulp = tree["b"]["w"].copy()
    one_ulp[1, 2] = np.nextafter(one_ulp[1, 2], np.float32(9))
    variants = [
        {**tree, "b": {"w": one_ulp}},  # one value, by one ulp
        {**tree, "b": {"w": tree["b"]["w"].astype(jnp.bfloat16)}},  # dtype
        {**tree, "b": {"w": tree["b"]["w"].reshape(3, 2)}},  # shape, same bytes
        {"a": tree["a"], "c": tree["b"]},  # name, same bytes
    ]
    assert len({fp, *map(data.params_fingerprint, variants)}) == 5


def test_token_shards_on_several_hosts(tmp_path, monkeypatch):
    """Host 0 writes, every host meets at the barrier, other hosts write nothing and then read host 0's shards."""
    from jax.experimental import multihost_utils

    barriers = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    out = tmp_path / "shared" / "tokens"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(FileNotFoundError, match=r"Process 1 cannot see the token directory .*tokens that process 0"):
        data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer=TOKENIZER)
    assert not (tmp_path / "shared").exists()  # host 1 wrote nothing, not even a temporary directory
    assert barriers == [f"jaxgen.data.write_token_shards:{out}"]
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer=TOKENIZER)
    assert len(barriers) == 2 and data.read_token_metadata(out)["num_examples"] == 296
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # host 1 on a shared filesystem: reads host 0's shards
    assert data.write_token_shards(_encode, DIGITS, out, split="test", tokenizer=TOKENIZER) == out
    assert len(barriers) == 3 and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process: no barrier
    pretokenize.sync_hosts("x")
    assert len(barriers) == 3
    # ensure_token_shards: host 0's decision holds on every host, even where host 1 sees no shards.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    decisions = []
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: decisions.append(int(x)) or np.int32(1))
    elsewhere = tmp_path / "not_shared"
    written, why = data.ensure_token_shards(_encode, DIGITS, elsewhere, split="test", tokenizer=TOKENIZER)
    assert (written, why, decisions) == (False, f"no complete token directory at {elsewhere}", [0])
    assert not elsewhere.exists() and len(barriers) == 3


def test_ensure_token_shards_rewrites_on_a_new_key(tmp_path):
    out, calls = tmp_path / "tokens", []

    def encode(images):
        calls.append(images.shape[1])
        return _encode(images)

    ensure = functools.partial(data.ensure_token_shards, encode, split="test", tokenizer=TOKENIZER, batch_size=300)
    assert ensure(DIGITS, out) == (True, f"no complete token directory at {out}") and calls == [16]
    assert ensure(DIGITS, out)[0] is False and calls == [16]  # same key: reused
    written, why = ensure({**DIGITS, "image_size": 32}, out)
    assert written and why.endswith("[test] at 16 px, now data.source=digits [test] at 32 px") and calls == [16, 32]
    assert data.read_token_metadata(out)["image_size"] == 32


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


@pytest.mark.parametrize("flip", [False, True])
def test_iterator_shards_per_host(monkeypatch, flip):
    """Two hosts read the two halves of the one-host run's global batches (flips included), batch after batch."""
    cfg = {**DIGITS, "random_flip": flip}
    one_host = _batches(data.make_train_iterator(cfg, global_batch_size=8, seed=0), 3)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for host in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        batches = _batches(data.make_train_iterator(cfg, global_batch_size=8, seed=0), 3)
        assert batches[0]["image"].shape == (4, 16, 16, 3)
        _assert_same([{k: v[host * 4 : host * 4 + 4] for k, v in b.items()} for b in one_host], batches)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
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
