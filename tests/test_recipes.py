"""The ImageNet recipes run: `configs/var_imagenet.py:d16` and `configs/llamagen_imagenet.py:B`, overridden down to
tiny sizes through their own fields, train generator-only on a tokenizer checkpoint through `train_and_evaluate` on a
tiny tfds dataset written by a real builder (tests/tfds_fixture.py); and the recipes carry upstream's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxgen.config_util import load_config

REPO = Path(__file__).resolve().parents[1]


def _shrink_train(cfg, steps: int = 4) -> None:
    cfg.train_generator.update(
        steps=steps,
        batch_size=8,
        warmup_steps=1,
        log_every=2,
        ckpt_every=steps,
        sample_every=0,
        compute_dtype="float32",
    )
    cfg.grid.update(classes=(0, 1, 2), per_class=1)
    cfg.eval.sample_batches = 0


def shrink_var_imagenet(cfg):
    """configs/var_imagenet.py at 32 px / 3 classes (the tfds fixture's): a 3-scale VQVAE, a depth-2 VAR."""
    cfg.vae.update(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    cfg.var.update(depth=2, embed_dim=64, num_heads=2, num_classes=3, drop_path_rate=0.0)
    cfg.data.update(image_size=32)
    _shrink_train(cfg)
    return cfg


def shrink_llamagen_imagenet(cfg):
    """configs/llamagen_imagenet.py:B at 32 px / 3 classes: a 4x VQ (8 x 8 tokens), a 2-layer GPT."""
    cfg.vq.update(codebook_size=32, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    cfg.gpt.update(vocab_size=32, num_classes=3, dim=64, n_layer=2, n_head=2, block_size=64)
    cfg.image_size = 32
    cfg.data.update(image_size=32)
    _shrink_train(cfg)
    return cfg


# ---- the recipes carry upstream's training sections ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "batch", "epochs", "lr", "wpe"),
    [  # FoundationVision/VAR README "Training Scripts"; lr = tblr * bs / 256 (utils/arg_util.py)
        ("d16", 768, 200, 3e-4, 0.1),
        ("d20", 768, 250, 3e-4, 0.1),
        ("d24", 768, 350, 2.4e-4, 0.01),
        ("d30", 1024, 350, 3.2e-4, 0.01),
        ("d36", 768, 350, 2.4e-4, 0.01),
    ],
)
def test_var_recipe_numbers(variant, batch, epochs, lr, wpe):
    cfg = load_config(str(REPO / f"configs/var_imagenet.py:{variant}"))
    t = cfg.train_generator
    per_epoch = math.ceil(1_281_167 / batch)
    assert (t.batch_size, t.steps, t.min_lr_ratio) == (batch, epochs * per_epoch, wpe)
    assert t.lr == pytest.approx(lr)
    assert t.warmup_steps == round(epochs / 50 * per_epoch)
    assert (t.b1, t.b2, t.weight_decay, t.grad_clip, t.ema_decay) == (0.9, 0.95, 0.05, 2.0, 0.0)
    assert t.compute_dtype == "bfloat16" and cfg.stages == ("generator",)
    assert cfg.data.source.kind == "tfds" and cfg.data.source.name == "imagenet2012"
    assert cfg.data.image_size == (512 if variant == "d36" else 256) and not cfg.data.random_flip
    assert cfg.var.cond_drop_rate == 0.1


@pytest.mark.parametrize("variant", ["B", "L", "XL", "XXL", "3B", "L_384"])
def test_llamagen_recipe_numbers(variant):
    cfg = load_config(str(REPO / f"configs/llamagen_imagenet.py:{variant}"))
    t = cfg.train_generator
    assert (t.batch_size, t.steps) == (256, 300 * (1_281_167 // 256))  # train_c2i.py: 300 epochs, drop_last
    assert (t.lr, t.min_lr_ratio, t.warmup_steps) == (1e-4, 1.0, 0)  # constant
    assert (t.b1, t.b2, t.weight_decay, t.grad_clip, t.ema_decay) == (0.9, 0.95, 0.05, 1.0, 0.0)
    assert t.compute_dtype == "bfloat16" and cfg.gpt.class_dropout_prob == 0.1
    assert cfg.data.image_size == cfg.image_size and cfg.gpt.block_size == (cfg.image_size // 16) ** 2
    from jaxgen.train.optim import learning_rate_schedule

    schedule = learning_rate_schedule(t)
    assert [float(schedule(s)) for s in (0, 1000, t.steps - 1)] == pytest.approx([1e-4] * 3)


@pytest.mark.parametrize(("variant", "tokens", "steps"), [("256", 256, 8), ("512", 1024, 12)])
def test_maskgit_recipe_numbers(variant, tokens, steps):
    """maskgit/configs/maskgit_class_cond_config.py over base_config.py, and the paper's decode steps."""
    cfg = load_config(str(REPO / f"configs/maskgit_imagenet.py:{variant}"))
    t = cfg.train_generator
    assert (t.batch_size, t.steps, t.lr, t.min_lr_ratio, t.warmup_steps) == (256, 2_000_000, 1e-4, 1.0, 5000)
    assert (t.b1, t.b2, t.weight_decay, t.ema_decay) == (0.9, 0.96, 0.045, 0.999)
    m = cfg.maskgit
    assert (m.dropout, m.attention_dropout, m.label_smoothing, m.mask_schedule) == (0.1, 0.1, 0.1, "cosine")
    assert (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.num_tokens) == (768, 24, 16, 3072, tokens)
    assert m.class_dropout_prob == 0.0  # the release has no null class
    s = cfg.sampling
    assert (s.num_iter, s.choice_temperature, s.schedule, s.cfg_scale) == (steps, 4.5, "cosine", 0.0)
    from jaxgen.train.optim import learning_rate_schedule

    schedule = learning_rate_schedule(t)
    assert [float(schedule(x)) for x in (5000, 100_000, t.steps - 1)] == pytest.approx([1e-4] * 3)
    assert float(schedule(2500)) == pytest.approx(0.5e-4, rel=1e-3)


@pytest.mark.parametrize(
    ("variant", "sampling", "params"),
    [  # NVlabs/HMAR config/sample/hmar-d*.yaml; parameter counts of the released checkpoints (fixture key lists)
        ("d16", (1.7, 1000, 0.99), 467_691_904),
        ("d20", (1.9, 950, 0.99), 845_517_872),
        ("d24", (2.1, 900, 0.99), 1_384_328_960),
        ("d30", (1.7, 1000, 0.99), 2_556_324_212),
    ],
)
def test_hmar_recipe_numbers(variant, sampling, params):
    """config/experiment/hmar-train-d* (VAR's stage-1 recipe, lognorm) and hmar-finetune-mask-d* (100 epochs, the
    last 8 blocks), the sampling configs, and the released model sizes."""
    from jaxgen.convert.common import count_params
    from jaxgen.families import build_models, param_shapes
    from jaxgen.sampling.hmar import RELEASED_SCHEDULE

    cfg = load_config(str(REPO / f"configs/hmar_imagenet.py:{variant}"))
    var = load_config(str(REPO / f"configs/var_imagenet.py:{variant}"))
    assert cfg.stages == ("generator", "mask") and cfg.hmar.mask_layers == 8 and cfg.hmar.loss_weighting == "lognorm"
    assert cfg.train_generator.to_dict() == var.train_generator.to_dict()
    per_epoch = math.ceil(1_281_167 / cfg.train_generator.batch_size)
    assert (cfg.train_mask.steps, cfg.train_mask.warmup_steps) == (100 * per_epoch, 2 * per_epoch)
    assert cfg.train_mask.lr == cfg.train_generator.lr
    s = cfg.sampling
    assert (s.cfg, s.top_k, s.top_p) == sampling and s.mask_schedule == RELEASED_SCHEDULE and s.refine
    family, vae, model = build_models(cfg)
    assert count_params(param_shapes(family, vae, model)["hmar"]) == params


def shrink_maskgit_imagenet(cfg):
    """configs/maskgit_imagenet.py:256 at 32 px / 3 classes: a 4x tokenizer (8 x 8 tokens), a 2-layer transformer."""
    cfg.vq.update(codebook_size=32, embedding_dim=8, filters=32, channel_multipliers=(1, 2, 2), num_res_blocks=1)
    cfg.maskgit.update(codebook_size=32, num_classes=3, num_tokens=64, hidden_size=64, num_layers=2, num_heads=2,
                       intermediate_size=128)  # fmt: skip
    cfg.sampling.num_iter = 4
    cfg.image_size = 32
    cfg.data.update(image_size=32)
    _shrink_train(cfg)
    return cfg


# ---- jaxgen trains them (generator-only, on a tokenizer checkpoint) ----------------------------------------------


def _tokenizer_export(cfg, directory: Path) -> str:
    """A random-init tokenizer written as `save_pretrained` writes a tokenizer stage's export."""
    from jaxgen.families import build_models
    from jaxgen.models.registry import init_params
    from jaxgen.pretrained import save_pretrained

    family, tokenizer, _ = build_models(cfg)
    size = int(cfg.data.image_size)
    params = init_params(tokenizer, jax.random.key(1), jnp.zeros((1, size, size, 3)))
    key = family.tokenizer_key
    return str(save_pretrained(directory, {key: params}, {"family": cfg.family, key: cfg[key].to_dict()}))


@pytest.mark.parametrize(
    ("spec", "shrink"),
    [  # the VAR run takes ~120 s on 2 busy cores (the LlamaGen one ~45 s)
        pytest.param("configs/var_imagenet.py:d16", shrink_var_imagenet, marks=pytest.mark.slow),
        ("configs/llamagen_imagenet.py:B", shrink_llamagen_imagenet),
        pytest.param("configs/maskgit_imagenet.py:256", shrink_maskgit_imagenet, marks=pytest.mark.slow),
    ],
    ids=["var_d16", "llamagen_B", "maskgit_256"],
)
def test_imagenet_recipe_trains_on_tfds(tmp_path, spec, shrink):
    from jaxgen.train.loop import train_and_evaluate
    from tests.tfds_fixture import NAME, prepare

    cfg = shrink(load_config(str(REPO / spec)))
    cfg.data.source.update(name=NAME, data_dir=prepare(tmp_path / "tfds"))  # the recipe's tfds source, another name
    cfg.tokenizer_checkpoint = _tokenizer_export(cfg, tmp_path / "tokenizer")
    workdir = tmp_path / "run"
    train_and_evaluate(cfg, workdir)
    steps = cfg.train_generator.steps
    with ocp.CheckpointManager(workdir / "generator" / "checkpoints") as mngr:
        assert mngr.latest_step() == steps
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x.get("stage") == "generator" and "loss" in x]
    assert losses and all(np.isfinite(losses)), lines


# ---- sample_every = 0: one grid, at the end ------------------------------------------------------------------------


def test_sample_every_zero_writes_one_grid_at_the_end(tmp_path):
    """sections.train_section: "grids from the EMA params (0 = only at the end)"."""
    from jaxgen.train.loop import train_and_evaluate

    cfg = load_config(str(REPO / "configs/digits_var.py:smoke"))
    cfg.vae.update(ch=32, vocab_size=32, z_channels=8)
    cfg.var.update(depth=1, embed_dim=32, num_heads=2)
    for name in ("train_tokenizer", "train_generator"):
        cfg[name].update(steps=4, batch_size=16, log_every=2, ckpt_every=4, sample_every=0)
    train_and_evaluate(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "tokenizer" / "samples").glob("*.png")) == ["recon_000004.png"]
    assert sorted(p.name for p in (tmp_path / "generator" / "samples").glob("*.png")) == ["samples_000004.png"]
