"""`jaxgen.train.checks.check_config`: configs that cannot work fail before anything compiles, with one line that
names the config field; every configs/*.py refuses a variant it does not define."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from jaxgen.config_util import load_config
from jaxgen.families import build_models
from jaxgen.models.registry import init_params
from jaxgen.pretrained import save_pretrained
from jaxgen.train.checks import check_config, check_train_section
from tests.test_recipes import shrink_llamagen_imagenet, shrink_var_imagenet

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_refuses_an_unknown_variant_and_lists_the_valid_ones(path):
    module = _module(path)
    variants = module.VARIANTS
    for v in variants:  # every listed variant builds
        assert module.get_config(v) if v else module.get_config()
    with pytest.raises(ValueError, match=r"unknown variant 'bogus'|has no variant 'bogus'") as e:
        module.get_config("bogus")
    for v in variants:
        assert repr(v) in str(e.value) or not v
    assert f"configs/{path.name}" in str(e.value)


def test_var_tiny_no_longer_accepts_d16():
    with pytest.raises(ValueError, match=r"configs/var_tiny.py has no variant 'd16'.*--config=configs/var_tiny.py"):
        load_config(str(REPO / "configs/var_tiny.py:d16"))


def _smoke():
    return load_config(str(REPO / "configs/digits_var.py:smoke"))


def test_the_recipes_pass():
    check_config(_smoke())
    check_config(load_config(str(REPO / "configs/digits_llamagen.py:smoke")))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, r"train_generator.batch_size=0: must be a positive integer"),
        ("batch_size", -8, r"train_generator.batch_size=-8: must be a positive integer"),
        ("steps", 0, r"train_generator.steps=0: must be a positive integer"),
        ("accum_steps", 0, r"train_generator.accum_steps=0: must be a positive integer"),
        ("log_every", 0, r"train_generator.log_every=0: must be a positive integer"),
        ("ckpt_every", -5, r"train_generator.ckpt_every=-5: must be a positive integer"),
        ("sample_every", -1, r"train_generator.sample_every=-1: must be an integer >= 0"),
        ("accum_steps", 3, r"train_generator.batch_size=64 is not divisible by accum_steps=3"),
        ("ckpt_every", 7, r"train_generator.ckpt_every=7 must be a multiple of log_every=5"),
    ],
)
def test_bad_train_fields_name_the_field(field, value, message):
    cfg = _smoke()
    cfg.train_generator[field] = value
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


def test_a_batch_that_does_not_split_over_the_batch_mesh_axes():
    assert jax.device_count() == 8  # tests/conftest.py
    cfg = _smoke()
    cfg.train_generator.batch_size = 12  # data = -1: 8 shards
    with pytest.raises(
        ValueError, match=r"train_generator.batch_size=12 does not split over .*data=8 x fsdp=1 = 8 shards"
    ):
        check_config(cfg)
    cfg.train_generator.update(batch_size=24, accum_steps=2)  # micro-batches of 12
    with pytest.raises(ValueError, match=r"batch_size / accum_steps = 24 / 2 = 12 does not split .*multiple of 8"):
        check_config(cfg)
    cfg.train_generator.update(batch_size=32, accum_steps=2)
    check_config(cfg)
    # the 'batch' rule decides which axes count: data=2 x fsdp=4 with the batch over 'data' only needs 2
    cfg.train_generator.update(batch_size=6, accum_steps=1)
    cfg.parallel.mesh.update(data=2, fsdp=4)
    with pytest.raises(ValueError, match=r"data=2 x fsdp=4 = 8 shards"):
        check_config(cfg)
    cfg.parallel.rules = [["batch", "data"] if r[0] == "batch" else r for r in cfg.parallel.rules]
    check_config(cfg)


def test_a_batch_that_does_not_split_over_the_processes():
    t = _smoke().train_generator
    t.batch_size = 10
    with pytest.raises(ValueError, match=r"train_generator.batch_size=10 does not split over the 4 processes"):
        check_train_section(t, "train_generator", {"data": 2}, num_processes=4)
    check_train_section(t, "train_generator", {"data": 2}, num_processes=2)


def test_stages_and_sections():
    cfg = _smoke()
    cfg.stages = ("tokenizer", "sampler")
    with pytest.raises(ValueError, match=r"config.stages=.*each must be one of \('tokenizer', 'generator'\)"):
        check_config(cfg)
    cfg.stages = ("generator", "tokenizer")
    with pytest.raises(ValueError, match=r"in that order"):
        check_config(cfg)
    cfg = _smoke()
    del cfg["train_generator"]
    with pytest.raises(ValueError, match=r"config.stages has 'generator' but the config has no train_generator"):
        check_config(cfg)


# ---- generator-only training: the tokenizer checkpoint against the config --------------------------------------


def _tokenizer_checkpoint(cfg, directory: Path, family: str = "var", config_json: bool = True) -> str:
    """A `save_pretrained` export of the random-init tokenizer that `cfg` builds (like the tokenizer stage's)."""
    fam, tokenizer, _ = build_models(cfg)
    size = cfg.data.image_size
    params = init_params(tokenizer, jax.random.key(0), jax.numpy.zeros((1, size, size, 3)))
    section = cfg[fam.tokenizer_key].to_dict() if config_json else None
    meta = {"family": family, **({fam.tokenizer_key: section} if section else {})}
    return str(save_pretrained(directory, {fam.tokenizer_key: params}, meta))


def test_generator_only_run_needs_a_tokenizer_checkpoint():
    cfg = shrink_var_imagenet(load_config(str(REPO / "configs/var_imagenet.py:d16")))
    with pytest.raises(ValueError, match=r"config.tokenizer_checkpoint is empty .*python -m jaxgen.convert"):
        check_config(cfg)
    cfg.tokenizer_checkpoint = "/nonexistent/tok"
    with pytest.raises(FileNotFoundError, match=r"config.tokenizer_checkpoint=/nonexistent/tok is not a jaxgen"):
        check_config(cfg)


def test_tokenizer_checkpoint_of_another_size_names_the_field(tmp_path):
    cfg = shrink_var_imagenet(load_config(str(REPO / "configs/var_imagenet.py:d16")))
    other = cfg.copy_and_resolve_references()
    other.vae.z_channels = 16  # the tiny recipe has 8
    cfg.tokenizer_checkpoint = _tokenizer_checkpoint(other, tmp_path / "z16")
    with pytest.raises(ValueError, match=r"written with vae.z_channels=16 but the config has vae.z_channels=8") as e:
        check_config(cfg)
    assert "\n" not in str(e.value)
    # without the section in config.json the param shapes (Orbax metadata) still catch it, naming the param
    cfg.tokenizer_checkpoint = _tokenizer_checkpoint(other, tmp_path / "z16_bare", config_json=False)
    with pytest.raises(ValueError, match=r"does not fit config.vae: .* is \(.*16.*\) in the checkpoint but"):
        check_config(cfg)
    # the same tokenizer passes, also with a training-only field (EMA codebook) in the run config only
    cfg.tokenizer_checkpoint = _tokenizer_checkpoint(cfg, tmp_path / "same")
    cfg.vae.ema_decay = 0.99
    check_config(cfg)


def test_tokenizer_checkpoint_of_another_family(tmp_path):
    cfg = shrink_var_imagenet(load_config(str(REPO / "configs/var_imagenet.py:d16")))
    cfg.tokenizer_checkpoint = _tokenizer_checkpoint(cfg, tmp_path / "tok", family="llamagen")
    with pytest.raises(ValueError, match=r"is a llamagen checkpoint but config.family='var': use configs/llamagen_"):
        check_config(cfg)


def test_llamagen_tokenizer_checkpoint_of_another_codebook(tmp_path):
    cfg = shrink_llamagen_imagenet(load_config(str(REPO / "configs/llamagen_imagenet.py:B")))
    other = cfg.copy_and_resolve_references()
    other.vq.update(codebook_size=64)
    other.gpt.update(vocab_size=64)
    cfg.tokenizer_checkpoint = _tokenizer_checkpoint(other, tmp_path / "v64", family="llamagen")
    with pytest.raises(ValueError, match=r"vq.codebook_size=64 but the config has vq.codebook_size=32"):
        check_config(cfg)
    meta = json.loads((tmp_path / "v64" / "config.json").read_text())
    assert meta["family"] == "llamagen"
