"""Params-only checkpoints (`jaxgen.pretrained`): sharded exports round-trip, a training workdir resolves to its
generator export, and a checkpoint of another family, an incomplete workdir or a damaged file are one-line errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.pretrained import load_pretrained, resolve_checkpoint, save_pretrained


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "vae": {"w": rng.normal(size=(16, 8)).astype(np.float32)},
        "var": {"b": rng.normal(size=(8,)).astype(np.float32)},
    }


def test_params_sharded_over_eight_devices_are_saved_whole(tmp_path):
    """What a training export writes: arrays split over a mesh (no host holds them gathered) come back whole."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    host = _tree()
    sharded = {
        "vae": {"w": jax.device_put(host["vae"]["w"], NamedSharding(mesh, P("fsdp", "tensor")))},
        "var": {"b": jax.device_put(host["var"]["b"], NamedSharding(mesh, P("fsdp")))},
    }
    assert not sharded["vae"]["w"].sharding.is_fully_replicated
    save_pretrained(tmp_path / "export", sharded, {"family": "var"})
    config, params = load_pretrained(tmp_path / "export")
    assert config == {"family": "var"}
    for want, got in zip(jax.tree.leaves(host), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_a_training_workdir_resolves_to_its_generator_export(tmp_path):
    save_pretrained(tmp_path / "run" / "generator" / "export", _tree(), {"family": "var"})
    assert resolve_checkpoint(tmp_path / "run") == (tmp_path / "run" / "generator" / "export").absolute()
    save_pretrained(tmp_path / "half" / "tokenizer" / "export", {"vae": _tree()["vae"]}, {"family": "var"})
    with pytest.raises(FileNotFoundError, match="no trained generator yet"):
        resolve_checkpoint(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not a jaxgen checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_checkpoint_of_another_family_names_the_configs_to_use(tmp_path):
    save_pretrained(tmp_path / "ckpt", _tree(), {"family": "llamagen"})
    with pytest.raises(ValueError, match=r"is a llamagen checkpoint.*use configs/llamagen_\*\.py"):
        load_pretrained(tmp_path / "ckpt", family="var")
    load_pretrained(tmp_path / "ckpt", family="llamagen")  # the right family loads


def test_damaged_checkpoint_is_named(tmp_path):
    save_pretrained(tmp_path / "ckpt", _tree(), {"family": "var"})
    data = [p for p in (tmp_path / "ckpt" / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert data
    for p in data:  # garble every array file (Orbax/TensorStore chunks and metadata)
        p.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt is damaged"):
        load_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is damaged"):
        load_pretrained(tmp_path / "ckpt")
