"""The Axial Transformer: the Pallas axial kernel inside the model against xla (forward and gradients), causality,
the cached sampler against teacher forcing, the pixel tokenizer, sharding, bad input, and the binary end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.families import FAMILIES, param_shapes
from jaxgen.families.axial import build, held_out, objective
from jaxgen.models.generators.axial import AxialConfig, AxialTransformer, bits_per_dim
from jaxgen.models.tokenizers.pixels import PixelConfig, PixelTokenizer
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel.partition import abstract_boxed_params, activation_rules, shard_batch, tree_shardings
from jaxgen.parallel.rules import DEFAULT_RULES
from jaxgen.sampling.axial import AxialSampler, AxialSampling
from tests.conftest import REPO

# Small models with every kind of block: non-square (H != W), head_dim 8 (the kernel pads it to 16), odd inner depth;
# residual and logit projections at unit scale so that random weights give O(1) logits that depend on the input.
GRAY = AxialConfig(height=5, width=7, channels=1, hidden_size=32, num_heads=4, mlp_factor=2, num_outer_layers=2,
                   num_inner_layers=1, res_init_scale=1.0, logits_init_scale=1.0)  # fmt: skip
RGB = dataclasses.replace(GRAY, channels=3, num_exterior_layers=2, mlp_factor=1)
COND = dataclasses.replace(GRAY, num_classes=3)


def _init(cfg: AxialConfig, seed: int = 0):
    model = AxialTransformer(cfg)
    return model, model.init(jax.random.key(seed), *model.example_inputs())["params"]


def _pixels(cfg: AxialConfig, b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, cfg.height, cfg.width, cfg.channels)).astype(np.int32)


def _with_backend(cfg: AxialConfig, backend: str) -> AxialTransformer:
    return AxialTransformer(dataclasses.replace(cfg, attn_backend=backend))


# The kernel and xla differ by float32 summation order only. Measured on these models (matmul precision "highest"):
# logits 1.2e-6 apart of |logits| <= 3.9 (3e-7 relative), gradients 2.2e-8 apart of a largest entry 0.13 (1.7e-7);
# 1e-5 of the largest value leaves ~30x room and fails on any masking or layout error (those move logits by O(1)).
KERNEL_TOL = 1e-5


@pytest.mark.parametrize("cfg", [GRAY, RGB], ids=["gray", "rgb"])
def test_pallas_kernel_in_the_model_equals_xla(cfg):
    """Logits and the gradients of the bits-per-dim loss w.r.t. every param: backend 'pallas' (the axial kernel in
    interpret mode, forward and backward kernels) against 'xla' (the dense masked softmax)."""
    _, params = _init(cfg)
    x, labels = _pixels(cfg), np.zeros(2, np.int32)

    def loss(model):
        return lambda p: bits_per_dim(model.apply({"params": p}, labels, x), x)[1].mean()

    outs = {}
    for backend in ("xla", "pallas"):
        model = _with_backend(cfg, backend)
        logits = model.apply({"params": params}, labels, x)
        outs[backend] = (np.asarray(logits), jax.grad(loss(model))(params))
    ref_logits, ref_grads = outs["xla"]
    got_logits, got_grads = outs["pallas"]
    assert np.abs(ref_logits).max() > 1.0
    np.testing.assert_allclose(got_logits, ref_logits, atol=KERNEL_TOL * np.abs(ref_logits).max(), rtol=0)
    top = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))  # k's bias has a zero gradient: use
    worst = 0.0  # the largest gradient entry of the model as the scale, not each param's own
    for (path, g_ref), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(got_grads),
                                strict=True):  # fmt: skip
        diff = float(np.abs(np.asarray(g) - np.asarray(g_ref)).max())
        assert diff <= KERNEL_TOL * top, (jax.tree_util.keystr(path), diff, top)
        worst = max(worst, diff)
    print(
        f"logits max diff {np.abs(got_logits - ref_logits).max():.3g} of {np.abs(ref_logits).max():.3g}; "
        f"gradients max diff {worst:.3g} of {top:.3g}"
    )
    assert any(float(np.abs(g).max()) > 1e-3 for g in jax.tree.leaves(ref_grads))


def test_one_channel_model_is_causal_in_raster_order():
    """Changing pixel (r, c) moves no logit at or before it in raster order, and some after it."""
    model, params = _init(GRAY)
    x = _pixels(GRAY)
    fwd = jax.jit(lambda x: model.apply({"params": params}, jnp.zeros(2, jnp.int32), x)[..., 0, :])
    base = np.asarray(fwd(x))
    h, w = GRAY.height, GRAY.width
    for r, c in [(0, 0), (2, 3), (h - 1, w - 1), (1, w - 1)]:
        y = x.copy()
        y[:, r, c, 0] = (y[:, r, c, 0] + 101) % 256
        diff = np.abs(np.asarray(fwd(y)) - base).max(axis=(0, 3)).reshape(-1)  # per pixel, raster order
        k = r * w + c
        assert diff[: k + 1].max() == 0.0, (r, c)
        if k < h * w - 1:
            assert diff[k + 1 :].max() > 1e-3, (r, c)


def test_three_channel_model_is_causal_over_channels():
    """Channel k's logits do not move when channels >= k change (any pixel), and move when an earlier one does."""
    model, params = _init(RGB)
    x = _pixels(RGB)
    fwd = jax.jit(lambda x: model.apply({"params": params}, jnp.zeros(2, jnp.int32), x))
    base = np.asarray(fwd(x))
    for k in range(3):
        y = x.copy()
        y[..., k] = (y[..., k] + 77) % 256  # every pixel of channel k
        diff = np.abs(np.asarray(fwd(y)) - base).max(axis=(0, 1, 2, 4))  # per channel
        assert diff[:k].max(initial=0.0) == 0.0
        if k < 2:
            assert diff[k + 1 :].min() > 1e-3  # later channels see channel k through the conditioning stack


@pytest.mark.parametrize("cfg", [GRAY, RGB, COND], ids=["gray", "rgb", "class_conditional"])
def test_cached_sampler_agrees_with_teacher_forcing(cfg):
    """The fast sampler (row and column caches) draws argmax(logits + g) of the full model's teacher-forcing logits on
    its own sample at every (sub)pixel, for given Gumbel noise g; the labels condition the class-conditional model."""
    model, params = _init(cfg)
    sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=cfg.channels)))
    labels = np.array([0, 2], np.int32) if cfg.num_classes else np.zeros(2, np.int32)
    noise = np.asarray(jax.random.gumbel(jax.random.key(3), (2, cfg.height, cfg.width, cfg.channels, 256)))
    pixels = np.asarray(sampler.with_noise(params, labels, noise))
    logits = np.asarray(model.apply({"params": params}, labels, pixels))
    np.testing.assert_array_equal(np.argmax(logits + noise, axis=-1), pixels)
    assert len(np.unique(pixels)) > 20  # a draw, not a constant image
    if cfg.num_classes:
        other = np.asarray(sampler.with_noise(params, labels[::-1].copy(), noise))
        assert np.any(other != pixels)
    out = sampler(params, {}, labels, jax.random.key(0))  # the key's own noise
    assert out.pixels.shape == pixels.shape and out.images.shape == (2, cfg.height, cfg.width, 3)
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0


def test_sampling_filters():
    """top_k=1 is the arg-max of the teacher-forcing logits whatever the noise."""
    model, params = _init(GRAY)
    sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=1)), AxialSampling(top_k=1))
    noise = np.asarray(jax.random.gumbel(jax.random.key(1), (2, GRAY.height, GRAY.width, 1, 256)))
    pixels = np.asarray(sampler.with_noise(params, np.zeros(2, np.int32), noise))
    logits = np.asarray(model.apply({"params": params}, np.zeros(2, np.int32), pixels))
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), pixels)
    with pytest.raises(ValueError, match="temperature"):
        AxialSampling(temperature=0.0)


def test_pixel_tokenizer_round_trip():
    values = np.arange(256, dtype=np.int32).reshape(1, 16, 16, 1)
    rgb = PixelTokenizer(PixelConfig(channels=3))
    gray = PixelTokenizer(PixelConfig(channels=1))
    images = np.asarray(gray.apply({}, values, method="decode_pixels"))  # [1, 16, 16, 3], equal channels
    assert images.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(gray.apply({}, images, method="encode_ids")), values.reshape(1, -1))
    ids = np.asarray(rgb.apply({}, images, method="encode_ids"))
    np.testing.assert_array_equal(ids.reshape(1, 16, 16, 3), np.repeat(values, 3, axis=-1))
    assert gray.token_layout(16).num_tokens == 256 and rgb.token_layout(16).num_tokens == 768


def test_objective_and_held_out_metric():
    """One channel: the training loss is the held-out metric's bits per dim (no dropout); three channels: the loss is
    the mean over the images of the bits per dim of one channel each, every one of them a per-channel value."""
    for cfg in (GRAY, RGB):
        tok = PixelTokenizer(PixelConfig(channels=cfg.channels))
        model, params = _init(cfg)
        x = _pixels(cfg, b=4)
        batch = {"tokens": x.reshape(4, -1), "label": np.zeros(4, np.int32)}
        ctx = type("Ctx", (), {"rng": jax.random.key(0), "model_state": {}})()
        loss, _ = objective(tok, model)(params, batch, ctx)
        per_image = np.asarray(held_out(tok, model)(params, batch)["bits_per_dim"])
        nll, _ = bits_per_dim(model.apply({"params": params}, batch["label"], x), x)
        per_channel = np.asarray(nll).mean(axis=(1, 2)) / np.log(2.0)  # [B, C]
        if cfg.channels == 1:
            np.testing.assert_allclose(float(loss), per_image.mean(), rtol=1e-6)
        else:
            np.testing.assert_allclose(per_image, per_channel.mean(axis=1), rtol=1e-6)
            lo, hi = per_channel.min(axis=1).mean(), per_channel.max(axis=1).mean()
            assert lo - 1e-6 <= float(loss) <= hi + 1e-6


def _mesh222():
    return mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sharded_forward_equals_single_device(backend):
    """On a 2 x 2 x 2 mesh (params FSDP / tensor sharded, batch split; the Pallas kernel under shard_map) the logits
    equal one device's to float32 summation order (measured 1.2e-6 of |logits| <= 3.8; the bound is 1e-5 of it)."""
    cfg = dataclasses.replace(RGB, num_heads=2, attn_backend=backend)
    model, params = _init(cfg)
    x, labels = _pixels(cfg, b=4), np.zeros(4, np.int32)
    fwd = lambda p, lab, x: model.apply({"params": p}, lab, x)
    want = np.asarray(jax.jit(fwd)(params, labels, x))
    mesh = _mesh222()
    shardings = tree_shardings(abstract_boxed_params(model, jax.random.key(0), *model.example_inputs()), mesh,
                               DEFAULT_RULES)  # fmt: skip
    batch = shard_batch({"labels": labels, "x": x}, mesh, DEFAULT_RULES)
    with activation_rules(mesh, DEFAULT_RULES):
        got = jax.jit(fwd)(jax.device_put(params, shardings), batch["labels"], batch["x"])
    print(f"sharded vs one device: max diff {np.abs(np.asarray(got) - want).max():.3g} of {np.abs(want).max():.3g}")
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_every_param_has_logical_axis_names():
    model = AxialTransformer(dataclasses.replace(RGB, num_classes=3))
    known = {n for n, _ in DEFAULT_RULES}
    boxed = abstract_boxed_params(model, jax.random.key(0), *model.example_inputs())
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(b, nn.LogicallyPartitioned) for b in leaves)
    assert all(set(b.names) - {None} <= known and len(b.names) == b.value.ndim for b in leaves)


# ---- bad input: one clear error before compiling -------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    model, params = _init(GRAY)
    labels = np.zeros(2, np.int32)
    x = _pixels(GRAY)
    with pytest.raises(ValueError, match=r"pixel values must be in \[0, 255\].*max 256"):
        model.apply({"params": params}, labels, np.where(x == x.max(), 256, x))
    with pytest.raises(ValueError, match=r"pixel values must be in \[0, 255\].*min -1"):
        model.apply({"params": params}, labels, np.where(x == x.max(), -1, x))
    with pytest.raises(ValueError, match=r"integers 0\.\.255"):
        model.apply({"params": params}, labels, x.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\[B, 5, 7, 1\].*got shape \(2, 5, 7, 3\)"):
        model.apply({"params": params}, labels, np.zeros((2, 5, 7, 3), np.int32))  # channels it lacks
    with pytest.raises(ValueError, match=r"\[B, 5, 7, 1\].*got shape \(2, 7, 5, 1\)"):
        model.apply({"params": params}, labels, np.zeros((2, 7, 5, 1), np.int32))  # H and W swapped
    tok, gen = build({"channels": 1}, {"height": 16, "width": 16, "hidden_size": 32, "num_heads": 4})
    with pytest.raises(ValueError, match=r"data\.image_size=32 but the axial model is built for 16 x 16"):
        FAMILIES["axial"].check(tok, gen, 32)
    with pytest.raises(ValueError, match=r"axial\.channels=3 disagrees with the tokenizer"):
        build({"channels": 1}, {"channels": 3})
    with pytest.raises(ValueError, match="num_outer_layers must be even"):
        AxialConfig(num_outer_layers=3)
    sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=1)))
    with pytest.raises(ValueError, match=r"noise must be \[B, H, W, C, 256\]"):
        sampler.with_noise(params, labels, np.zeros((2, 5, 7, 256), np.float32))
    with pytest.raises(ValueError, match="channel"):
        AxialSampler(model, PixelTokenizer(PixelConfig(channels=3)))


def test_recipe_checks(tmp_path):
    """configs/digits_axial.py builds and passes the config checks; a tokenizer stage is refused with the reason."""
    from jaxgen.train.checks import check_config

    cfg = load_config(str(REPO / "configs/digits_axial.py"))
    check_config(cfg)
    assert cfg.stages == ("generator",)
    fam = FAMILIES["axial"]
    tok, gen = fam.build(cfg.pixels, cfg.axial)
    assert param_shapes(fam, tok, gen)["pixels"] == {}
    cfg.stages = ("tokenizer", "generator")
    cfg.train_tokenizer = dict(cfg.train_generator)
    with pytest.raises(ValueError, match="models pixels: its tokenizer has nothing to train"):
        check_config(cfg)


# ---- the binary end to end -----------------------------------------------------------------------------------------


def test_binary_trains_reports_bits_per_dim_and_its_workdir_samples(tmp_path):
    """`jaxgen.main` on digits_axial:smoke: held-out bits per dim, class fidelity and digits FID in the report, a grid,
    the export; then `jaxgen.sample` on the workdir draws the in-process sampler's pixels with the same key."""
    from jaxgen.sample import init_or_load, sampling_key

    workdir, out = tmp_path / "run", tmp_path / "samples"
    cmd = [sys.executable, "-m", "jaxgen.main", "--config=configs/digits_axial.py:smoke", f"--workdir={workdir}",
           "--config.train_generator.steps=6", "--config.train_generator.log_every=3",
           "--config.train_generator.ckpt_every=6", "--config.eval.every=0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())["generator"]
    assert 0 < report["held_out_bits_per_dim"] < 8.5 and report["held_out_images"] > 100  # 8 bits: uniform
    assert {"class_fidelity", "digits_fid", "digits_fid_real_floor"} <= set(report)
    assert (workdir / "final_samples.png").is_file() and (workdir / "generator" / "export" / "config.json").is_file()
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("held_out_bits_per_dim" in x for x in lines if x["stage"] == "generator_eval")

    cmd = [sys.executable, "-m", "jaxgen.sample", "--config=configs/digits_axial.py:smoke",
           f"--config.checkpoint={workdir}", f"--workdir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(str(REPO / "configs/digits_axial.py:smoke"))
    cfg.checkpoint = str(workdir)
    family, tokenizer, generator, params = init_or_load(cfg)
    labels = np.repeat(np.asarray(cfg.grid.classes, np.int32), cfg.grid.per_class)
    sampler = family.sampler(generator, tokenizer, cfg.sampling.to_dict())
    ours = sampler(params["axial"], params["pixels"], labels, sampling_key(cfg))
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["pixels"], np.asarray(ours.pixels))
