"""The tokenizer objective through the Step 3 train step: discriminator start, VQGAN's adaptive weight, EMA codebook
export, codebook-usage metrics, the missing-LPIPS error, and the three digits tokenizer configs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxgen.config_util import load_config
from jaxgen.data.sources import DigitsSource
from jaxgen.families import build_models
from jaxgen.models.discriminators import PatchDiscriminator
from jaxgen.train.loop import train_and_evaluate
from jaxgen.train.losses.adversarial import G_LOSSES
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import LossContext, make_train_step
from jaxgen.train.tokenizer_task import TokenizerLossConfig, inference_params, tokenizer_task

REPO = Path(__file__).resolve().parents[1]


def _tiny_vqgan_config(**vq):
    cfg = load_config(str(REPO / "configs/digits_vqgan.py:smoke"))
    cfg.vq.update(dict(codebook_size=32, ch=32, z_channels=16, **vq))
    return cfg


def _images(n=8, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


def _state(task, tc):
    tx = task.optimizer(tc)
    params, model_state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    return tx, create_state(params, tx, jax.random.key_data(jax.random.key(1)), model_state)


def _tc(**kw):
    import ml_collections

    return ml_collections.ConfigDict(train_section(**({"steps": 10, "lr": 1e-3, "warmup_steps": 0} | kw)))


def test_discriminator_only_starts_at_its_start_step():
    """Before `disc_start` the discriminator's params stay bit-identical (zero gradients into Adam, no weight decay
    on it) and the loss equals the loss without a discriminator; from the start step on they train."""
    _, tok, _ = build_models(_tiny_vqgan_config(), training=True)
    loss_cfg = TokenizerLossConfig(disc_weight=0.5, disc_start=2, disc_layers=2, disc_ndf=32)
    task = tokenizer_task(tok, loss_cfg, image_size=16)
    plain = tokenizer_task(tok, TokenizerLossConfig(), image_size=16)
    tc = _tc()
    tx, state = _state(task, tc)
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.9))
    batch = {"image": _images()}

    ctx = LossContext(rng=jax.random.key(2), step=jnp.int32(0), frozen=None, model_state=state.model_state)
    gan_loss, _ = jax.jit(task.loss_fn)(state.params, batch, ctx)
    plain_loss, _ = jax.jit(plain.loss_fn)({"tokenizer": state.params["tokenizer"]}, batch, ctx)
    np.testing.assert_allclose(gan_loss, plain_loss, rtol=1e-6)

    disc0 = jax.device_get(state.params["discriminator"])
    factors = []
    for i in range(4):
        before = jax.device_get(state.params["discriminator"])
        state, m = step(state, batch, None)
        factors.append(float(m["disc_factor"]))
        after = jax.device_get(state.params["discriminator"])
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
        assert same == (i < 2), f"step {i}: discriminator {'unchanged' if same else 'changed'}"
    assert factors == [0.0, 0.0, 1.0, 1.0]
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(disc0), jax.tree.leaves(after), strict=True))


def test_adaptive_weight_equals_explicit_last_layer_gradient_ratio():
    """lambda = disc_weight * |d nll / d W| / (|d G / d W| + 1e-4), W = decoder.conv_out.kernel, recomputed here from
    plain `jax.grad` over the whole param tree (an independent path from the loss's vjp). Tolerance 1e-5 relative:
    the same float32 gradients summed in another order."""
    _, tok, _ = build_models(_tiny_vqgan_config(), training=True)
    loss_cfg = TokenizerLossConfig(disc_weight=0.7, disc_start=0, disc_layers=2, disc_ndf=32, rec_loss="l2")
    task = tokenizer_task(tok, loss_cfg, image_size=16)
    params, model_state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    batch = {"image": _images()}
    ctx = LossContext(rng=jax.random.key(2), step=jnp.int32(0), frozen=None, model_state=model_state)
    _, (m, _) = jax.jit(task.loss_fn)(params, batch, ctx)

    disc = PatchDiscriminator(ndf=32, n_layers=2, norm="batch")
    rec_of = lambda p: tok.apply({"params": p}, batch["image"])[0]
    nll = lambda p: jnp.mean((rec_of(p) - batch["image"]) ** 2)
    g = lambda p: G_LOSSES["hinge"](disc.apply({"params": params["discriminator"]}, rec_of(p)))
    w_nll = np.asarray(jax.jit(jax.grad(nll))(params["tokenizer"])["decoder"]["conv_out"]["kernel"], np.float64)
    w_g = np.asarray(jax.jit(jax.grad(g))(params["tokenizer"])["decoder"]["conv_out"]["kernel"], np.float64)
    want = 0.7 * np.clip(np.linalg.norm(w_nll) / (np.linalg.norm(w_g) + 1e-4), 0.0, 1e4)
    np.testing.assert_allclose(float(m["disc_weight"]), want, rtol=1e-5)


def test_straight_through_gradients_reach_the_encoder():
    _, tok, _ = build_models(_tiny_vqgan_config(), training=True)
    task = tokenizer_task(tok, image_size=16)
    params, model_state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    ctx = LossContext(rng=jax.random.key(2), step=jnp.int32(0), frozen=None, model_state=model_state)
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, {"image": _images()}, ctx)[0]))(params)
    g = np.asarray(grads["tokenizer"]["encoder"]["conv_in"]["kernel"])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_ema_codebook_is_exported_into_inference_params():
    """With ema_decay > 0 the codebook trains in model_state; `inference_params` puts it where the inference model
    (EMA off) reads its codebook param, so both give the same token ids."""
    cfg = _tiny_vqgan_config(ema_decay=0.9)
    _, tok, _ = build_models(cfg, training=True)
    _, inference_tok, _ = build_models(cfg)
    task = tokenizer_task(tok, image_size=16)
    tc = _tc()
    tx, state = _state(task, tc)
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.9))
    book0 = np.asarray(state.model_state["variables"]["codebook"]["quantize"]["embedding"])
    for _ in range(3):
        state, _ = step(state, {"image": _images()}, None)
    book = state.model_state["variables"]["codebook"]
    assert not np.allclose(np.asarray(book["quantize"]["embedding"]), book0)
    exported = inference_params(state.params["tokenizer"], state.model_state["variables"])
    flat = traverse_util.flatten_dict(exported)
    assert ("quantize", "embedding", "embedding") in flat
    img = _images(seed=5)
    ids_ema = tok.apply({"params": state.params["tokenizer"], **state.model_state["variables"]}, img)[2]
    ids_inf = inference_tok.apply({"params": exported}, img)[2]
    np.testing.assert_array_equal(np.asarray(ids_ema), np.asarray(ids_inf))


def test_per_scale_codebook_usage_counts_the_codes_of_each_scale():
    """After one step, codebook_usage/scale_P = (distinct ids at the P x P scale) / V, counted here with numpy."""
    cfg = load_config(str(REPO / "configs/digits_msvq.py:smoke"))
    cfg.vae.update(vocab_size=64, z_channels=8)
    _, tok, _ = build_models(cfg, training=True)
    task = tokenizer_task(tok, TokenizerLossConfig(usage_window=5))
    params, model_state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    img = _images(n=16)
    ctx = LossContext(rng=jax.random.key(2), step=jnp.int32(0), frozen=None, model_state=model_state)
    _, (m, new_state) = jax.jit(task.loss_fn)(params, {"image": img}, ctx)
    ids = jax.jit(tok.apply)({"params": params["tokenizer"]}, img)[2]
    for p, scale_ids in zip(cfg.vae.patch_nums, ids, strict=True):
        want = len(np.unique(np.asarray(scale_ids))) / 64
        np.testing.assert_allclose(float(m[f"codebook_usage/scale_{p}"]), want, rtol=1e-6)
    all_ids = np.concatenate([np.asarray(i).reshape(-1) for i in ids])
    np.testing.assert_allclose(float(m["codebook_usage"]), len(np.unique(all_ids)) / 64, rtol=1e-6)
    assert int(new_state["last_hit"].max()) == 0


def test_missing_lpips_weights_is_a_clear_error_before_anything_runs(tmp_path):
    cfg = load_config(str(REPO / "configs/digits_vqgan.py:smoke"))
    cfg.tokenizer_loss.perceptual_weight = 1.0
    cfg.tokenizer_loss.lpips_weights = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError) as err:
        train_and_evaluate(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "nope.npz" in msg and "jaxgen.convert lpips" in msg and "perceptual_weight" in msg
    assert not (tmp_path / "run").exists()


_TOKENIZER_SECTION = {"digits_msvq": "vae", "digits_vqgan": "vq", "digits_titok": "titok"}
_VOCAB = {"digits_msvq": "vocab_size", "digits_vqgan": "codebook_size", "digits_titok": "codebook_size"}


@pytest.mark.parametrize("name", ["digits_msvq", "digits_vqgan", "digits_titok"])
def test_tokenizer_config_smoke_run_writes_metrics_grids_and_report(tmp_path, name):
    cfg = load_config(str(REPO / f"configs/{name}.py:smoke"))
    report = train_and_evaluate(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tok_rows = [r for r in rows if r.get("stage") == "tokenizer"]
    assert tok_rows and all("psnr" in r and "codebook_usage" in r and "perplexity" in r for r in tok_rows)
    if name == "digits_msvq":
        assert all(f"codebook_usage/scale_{p}" in r for r in tok_rows for p in cfg.vae.patch_nums)
        assert any("g_loss" in r for r in tok_rows)
    # ten steps already reconstruct better than the first five (logged every 5: the mean of steps 1-5 vs 6-10)
    assert tok_rows[-1]["rec_loss"] < tok_rows[0]["rec_loss"], [r["rec_loss"] for r in tok_rows]
    t = report["tokenizer"]
    vocab = cfg[_TOKENIZER_SECTION[name]][_VOCAB[name]]
    assert t["eval_images"] == len(DigitsSource("test", 16)) and t["codebook_usage"] * vocab >= 2  # no collapse
    assert list((tmp_path / "tokenizer" / "samples").glob("recon_*.png"))
    assert (tmp_path / "tokenizer" / "export" / "config.json").is_file()
    if "generator" in cfg.stages:
        g = report["generator"]
        assert g["num_samples"] == 20 and g["num_nonfinite"] == 0 and g["classifier_accuracy_real"] > 0.85


def test_sharded_gan_step_equals_single_device_step():
    """The tokenizer + discriminator step with an EMA codebook on a data=4 x fsdp=2 mesh of 8 CPU devices gives the
    single-device loss, gradient norm, params and codebook. The discriminator's batch statistics and the codebook's
    EMA sums are global because the batch is one global array. Plain SGD (lr 0.1) makes the params a linear function
    of the gradients, so they can be compared tightly (Adam's first step, lr * g / (|g| + eps), amplifies float noise
    in gradient entries near eps). Tolerance 1e-4 relative / 1e-6 absolute: float32 sums split over devices in
    another order, through an adaptive weight that is a ratio of gradient norms."""
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import partition
    from jaxgen.parallel.rules import DEFAULT_RULES

    _, tok, _ = build_models(_tiny_vqgan_config(ema_decay=0.9), training=True)
    task = tokenizer_task(tok, TokenizerLossConfig(disc_weight=0.5, disc_layers=2, disc_ndf=32), image_size=16)
    tx = optax.sgd(0.1)
    params, model_state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    state = create_state(params, tx, jax.random.key_data(jax.random.key(1)), model_state)
    step = make_train_step(task.loss_fn, tx, ema_decay=0.9)
    batch = {"image": _images(n=8)}
    single, m1 = jax.jit(step)(state, batch, None)

    mesh = mesh_lib.create_mesh({"data": 4, "fsdp": 2, "tensor": 1})

    def init_boxed():
        params, model_state = task.init(jax.random.key(0))
        return create_state(params, tx, jax.random.key_data(jax.random.key(1)), model_state)

    shardings = partition.tree_shardings(partition.abstract_boxed(init_boxed), mesh, DEFAULT_RULES)
    sharded_batch = partition.shard_batch(jax.device_get(batch), mesh, DEFAULT_RULES)
    with partition.activation_rules(mesh, DEFAULT_RULES):
        new, m8 = jax.jit(step, out_shardings=(shardings, None))(jax.device_put(state, shardings), sharded_batch, None)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(new.params))
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(
        jax.tree.leaves((new.params, new.model_state)),
        jax.tree.leaves((single.params, single.model_state)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
