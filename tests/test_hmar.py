"""HMAR: both training stages (loss weights, the stage-2 masking, which params each stage trains, the start of stage
2, the Pallas kernel against XLA), the sampler (schedules, refinement, its mask steps against teacher forcing) and
bad input. The golden check against the official code is tests/test_hmar_golden.py."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.families import FAMILIES, param_shapes
from jaxgen.families.hmar import (
    STAGES,
    build,
    mask_positions,
    scale_loss_weights,
    start_mask_stage,
    token_loss_weights,
)
from jaxgen.models.generators.hmar import HMARTransformer, in_mask_branch
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.pretrained import load_pretrained, save_pretrained
from jaxgen.sampling.hmar import HMARSampler, HMARSampling, check_mask_schedule
from jaxgen.train.checks import check_config
from jaxgen.train.generator_task import generator_task
from jaxgen.train.state import create_state
from jaxgen.train.step import LossContext, make_train_step
from tests.helpers import HMAR_FIXTURES, random_params

REPO = Path(__file__).resolve().parents[1]
FAMILY = FAMILIES["hmar"]
# Pallas (interpret mode) vs XLA, float32 on both sides, the kernel summing in another order: measured here, loss
# equal (difference 0.0), gradients <= 3.6e-6 of each leaf's largest entry. 1e-4 (as tests/test_attention_backends.py)
# leaves a wide margin and still catches any masking or scale error, which moves values by O(0.1-1).
TOL = 1e-4


def _config():
    cfg = load_config(str(REPO / "configs/digits_hmar.py:smoke"))
    cfg.vae.update(ch=32, vocab_size=32, z_channels=8)
    cfg.hmar.update(depth=3, mask_layers=2, embed_dim=32, num_heads=2)
    return cfg


@functools.lru_cache(maxsize=2)
def _models(backend: str = "xla"):
    cfg = _config()
    vae, model = build(cfg.vae, {**cfg.hmar.to_dict(), "attn_backend": backend})
    shapes = param_shapes(FAMILY, vae, model)
    return vae, model, random_params(shapes["vae"], 0), random_params(shapes["hmar"], 1)


def _batch(model, seed=0, batch=4):
    c = model.config
    rng = np.random.default_rng(seed)
    return {
        "tokens": jnp.asarray(rng.integers(0, c.vocab_size, (batch, c.seq_len)), jnp.int32),
        "label": jnp.asarray(rng.integers(0, c.num_classes, (batch,)), jnp.int32),
    }


def _ctx(vae_params, seed=3):
    return LossContext(rng=jax.random.key(seed), step=jnp.zeros((), jnp.int32), frozen=vae_params, model_state={})


# ---- stage 1: the loss weights ------------------------------------------------------------------------------------
def test_lognorm_weights_are_the_released_ones():
    """The per-scale totals of the released 256 / 512 px settings, as the fixture's JSON records upstream's."""
    released = json.loads((HMAR_FIXTURES / "hmar_fixture_A.json").read_text())["released_lognorm_loss_weights"]
    for setting in released.values():
        got = scale_loss_weights(setting["patch_nums"], "lognorm")
        np.testing.assert_allclose(got, setting["lognorm_total_weight_per_scale"], rtol=1e-12)
    pn = (1, 2, 3, 4)
    for weighting, total in (("lognorm", 1.0), ("equal", len(pn)), ("mean", 1.0)):
        w = token_loss_weights(pn, weighting)
        assert w.shape == (30,) and math.isclose(float(w.sum()), total, rel_tol=1e-6)
    np.testing.assert_allclose(token_loss_weights(pn, "mean"), 1 / 30, rtol=1e-6)
    np.testing.assert_allclose(token_loss_weights(pn, "equal")[5:14], 1 / 9, rtol=1e-6)  # the 3x3 scale


# ---- stage 2: which positions are masked ---------------------------------------------------------------------------
def test_mask_positions_count_per_scale_shared_by_the_batch():
    pn = (1, 2, 3, 4, 6)
    bounds = np.cumsum([0] + [p * p for p in pn[1:]])
    seen_counts = set()
    for seed in range(40):
        key = jax.random.key(seed)
        masked = np.asarray(mask_positions(key, pn))
        assert masked.shape == (1, sum(p * p for p in pn) - 1) and masked.dtype == bool
        ratio = float(jax.random.uniform(jax.random.split(key, len(pn))[0]))
        counts = [int(masked[0, a:b].sum()) for a, b in itertools.pairwise(bounds)]
        assert counts == [max(1, math.ceil(ratio * p * p)) for p in pn[1:]], (ratio, counts)
        seen_counts.add(counts[-1])
    assert len(seen_counts) > 10  # the ratio really varies from step to step


def test_stage2_loss_is_the_mean_over_masked_positions_only():
    """The stage-2 loss is the mean cross-entropy of the mask head's logits over the masked positions (the start
    token and unmasked positions do not count; they are inputs)."""
    vae, model, vae_p, params = _models()
    c = model.config
    batch, ctx = _batch(model), _ctx(vae_p)
    loss, (metrics, _) = STAGES[1].objective(vae, model)(params, batch, ctx)
    k_mask, k_drop = jax.random.split(ctx.rng)
    masked = mask_positions(k_mask, c.patch_nums)
    scales = vae.token_layout(16).split_scales(batch["tokens"])
    x = vae.apply({"params": vae_p}, scales, method=MultiScaleVQVAE.teacher_forcing_input)
    own = vae.apply({"params": vae_p}, scales, method=MultiScaleVQVAE.own_scale_input)
    logits = model.apply({"params": params}, batch["label"], x, own, masked, train=True, rngs={"dropout": k_drop},
                         method=HMARTransformer.masked_forward)  # fmt: skip
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, c.first_l :])
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(batch["tokens"])[:, c.first_l :, None], -1)[..., 0]
    m = np.broadcast_to(np.asarray(masked), ce.shape)
    assert 0 < m.mean() < 1 and float(metrics["masked_fraction"]) == pytest.approx(m.mean())
    assert float(loss) == pytest.approx(ce[m].mean(), rel=1e-5)
    assert abs(ce[~m].mean() - ce[m].mean()) > 1e-3  # the unmasked positions would give another number


# ---- what each stage trains --------------------------------------------------------------------------------------
def _run_steps(stage, start_params, steps=2, backend="xla"):
    vae, model, vae_p, _ = _models(backend)
    task = generator_task(FAMILY, vae, model, vae_p, stage, start_params)
    tc = _config().train_mask
    tx = task.optimizer(tc)
    init, _ = task.init(jax.random.key(7))
    state = create_state(init, tx, jax.random.key_data(jax.random.key(8)))
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.5))
    metrics = []
    for i in range(steps):
        state, m = step(state, _batch(model, seed=i), vae_p)
        metrics.append(m)
    return init, state, metrics


def _changed(before, after) -> dict[str, bool]:
    return {k: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]),
                                                             strict=True)) for k in before}  # fmt: skip


def test_stage2_trains_only_the_mask_branch_and_starts_from_stage1():
    _, _, _, stage1 = _models()
    init, state, metrics = _run_steps(STAGES[1], stage1)
    # the start: stage 1's params, the mask branch copied from the next-scale branch, a fresh mask_embed
    for name in init:
        if name == "mask_embed":
            continue
        source = name.replace("mask_blocks_", "ns_blocks_").replace("mask_head", "ns_head")
        for a, b in zip(jax.tree.leaves(init[name]), jax.tree.leaves(stage1[source]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    changed = _changed(init, state.params)
    assert {k for k, v in changed.items() if v} == {k for k in init if in_mask_branch(k)}, changed
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    # no optimizer moments for the frozen params: Adam's state holds only the mask branch
    n_train = sum(x.size for k in init if in_mask_branch(k) for x in jax.tree.leaves(init[k]))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_state == 2 * n_train


def test_stage1_leaves_the_mask_branch_untouched():
    init, state, _ = _run_steps(STAGES[0], None)
    changed = _changed(init, state.params)
    assert {k for k, v in changed.items() if v} == {k for k in init if not in_mask_branch(k)}


def test_start_mask_stage_keeps_logical_boxes():
    _, model, _, stage1 = _models()
    fresh = model.init(jax.random.key(0), *FAMILY.generator_inputs(model))["params"]
    started = start_mask_stage(fresh, stage1)
    assert jax.tree.structure(started, is_leaf=lambda x: hasattr(x, "names")) == jax.tree.structure(
        fresh, is_leaf=lambda x: hasattr(x, "names")
    )


# ---- Pallas kernel vs XLA, both stages' steps -----------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1], ids=["stage1_next_scale", "stage2_masked"])
def test_training_steps_with_pallas_equal_xla(stage):
    """The loss the stage's train step differentiates (`generator_task(...).loss_fn`: frozen params stop-gradient)
    and its gradients with the block-sparse Pallas kernel (interpret mode) equal the dense XLA path's (TOL relative
    to each leaf's largest gradient)."""
    vae, model_x, vae_p, params = _models("xla")
    _, model_p, _, _ = _models("pallas")
    s = STAGES[stage]
    batch, ctx = _batch(model_x), _ctx(vae_p)
    results = []
    for model in (model_x, model_p):
        task = generator_task(FAMILY, vae, model, vae_p, s, params if s.start else None)
        grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(params, batch, ctx)
        results.append((float(loss), grads))
    (loss_x, grads_x), (loss_p, grads_p) = results
    assert loss_x > 1.0 and abs(loss_p - loss_x) <= TOL * loss_x
    flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
    trained = 0
    for (path, gx), gp in zip(flat_x, jax.tree.leaves(grads_p), strict=True):
        scale = float(jnp.abs(gx).max())
        trained += scale > 0
        np.testing.assert_allclose(gp, gx, rtol=0, atol=TOL * scale + 1e-12, err_msg=jax.tree_util.keystr(path))
    assert trained > 10  # real gradients, not all frozen


# ---- the sampler --------------------------------------------------------------------------------------------------
SCHEDULE = ((1,), (1, 3), (2, 3, 4), (4, 4, 8))


def test_mask_steps_equal_teacher_forcing_with_drawn_tokens():
    """Sampled with top-k / top-p draws, every mask step's raw logits equal stage 2's teacher-forced forward on that
    step's tokens and masked positions (per sample), and the next-scale logits equal stage 1's on the final tokens:
    the sampler and the training forward are one model."""
    vae, model, vae_p, params = _models()
    c = model.config
    settings = HMARSampling(cfg=1.5, top_k=20, top_p=0.9, mask_schedule=SCHEDULE, return_trace=True)
    labels = jnp.asarray([3, 7], jnp.int32)
    out = HMARSampler(model, vae, settings)(params, vae_p, labels, jax.random.key(0))
    tokens = [np.asarray(i) for i in out.indices]
    x = vae.apply({"params": vae_p}, tokens, method=MultiScaleVQVAE.teacher_forcing_input)
    ns = model.apply({"params": params}, labels, x)
    for k, (a, b) in enumerate(c.scale_bounds):
        np.testing.assert_allclose(out.trace[f"ns_logits_s{k}"][:2], ns[:, a:b], atol=1e-4, err_msg=f"scale {k}")
    refined = 0
    for k, row in enumerate(SCHEDULE):
        for j in range(1, len(row)):
            step_tokens = [t.copy() for t in tokens]
            step_tokens[k] = np.asarray(out.trace[f"s{k}_m{j - 1}_idx" if j > 1 else f"ns_idx_s{k}"])
            mask = np.zeros((2, c.seq_len - c.first_l), bool)
            a, b = c.scale_bounds[k]
            mask[:, a - c.first_l : b - c.first_l] = np.asarray(out.trace[f"s{k}_m{j}_mask"])
            x = vae.apply({"params": vae_p}, step_tokens, method=MultiScaleVQVAE.teacher_forcing_input)
            own = vae.apply({"params": vae_p}, step_tokens, method=MultiScaleVQVAE.own_scale_input)
            for i in range(2):  # per sample: the mask differs between the two
                tf = model.apply({"params": params}, labels[i : i + 1], x[i : i + 1], own[i : i + 1], mask[i : i + 1],
                                 method=HMARTransformer.masked_forward)  # fmt: skip
                np.testing.assert_allclose(out.trace[f"s{k}_m{j}_logits"][i], tf[0, a:b], atol=1e-4)
            assert int(out.trace[f"s{k}_m{j}_mask"].sum()) == 2 * sum(row[j:])
            refined += int(np.sum(np.asarray(out.trace[f"s{k}_m{j}_idx"]) != step_tokens[k]))
    assert refined > 0  # the refinement re-drew some tokens


def test_the_schedule_is_a_sampling_setting():
    """Another schedule, or none, on the same params: different tokens where refinement re-draws, no mask steps
    without refinement, the same next-scale draw at the first scale."""
    vae, model, vae_p, params = _models()
    base = HMARSampler(model, vae, HMARSampling(greedy=True, mask_schedule=SCHEDULE, return_trace=True))
    labels = jnp.asarray([1, 2], jnp.int32)
    a = base(params, vae_p, labels, jax.random.key(0))
    b = base.with_settings(refine=False)(params, vae_p, labels, jax.random.key(0))
    c = base.with_settings(mask_schedule=((1,), (4,), (9,), (16,)))(params, vae_p, labels, jax.random.key(0))
    assert not any("_m" in k for k in b.trace) and not any("_m" in k for k in c.trace)
    for k in range(4):  # no mask steps: the same tokens either way
        np.testing.assert_array_equal(b.indices[k], c.indices[k])
    np.testing.assert_array_equal(a.indices[0], b.indices[0])
    assert any(not np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert np.all(np.isfinite(np.asarray(a.images))) and float(a.images.min()) >= 0 and float(a.images.max()) <= 1


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (((1,), (1, 3), (2, 3, 4)), r"has 3 rows but the model has 4 scales"),
        (((1,), (1, 2), (2, 3, 4), (16,)), r"mask_schedule\[1\]=\(1, 2\) does not fit scale 1 \(2x2 = 4 tokens\)"),
        (((1,), (4, 0), (9,), (16,)), r"mask_schedule\[1\]=\(4, 0\) .*positive"),
    ],
)
def test_schedules_that_do_not_fit_the_scales(schedule, message):
    with pytest.raises(ValueError, match=message):
        check_mask_schedule(schedule, (1, 2, 3, 4))
    vae, model, _, _ = _models()
    with pytest.raises(ValueError, match=message):
        HMARSampler(model, vae, HMARSampling(mask_schedule=schedule))
    cfg = _config()
    cfg.sampling.mask_schedule = schedule
    with pytest.raises(ValueError, match=r"config.sampling: .*" + message):
        check_config(cfg)


def test_the_released_schedule_needs_the_released_scales():
    vae, model, _, _ = _models()
    with pytest.raises(
        ValueError, match=r"mask_schedule is not set and patch_nums \(1, 2, 3, 4\) are not the released"
    ):
        HMARSampler(model, vae, HMARSampling(mask_schedule=None))
    HMARSampler(model, vae, HMARSampling(mask_schedule=None, refine=False))  # no refinement: no schedule needed


def test_mismatched_models_and_labels():
    cfg = _config()
    with pytest.raises(ValueError, match=r"hmar.patch_nums=\(1, 2, 4\) disagrees with the tokenizer"):
        build(cfg.vae, {**cfg.hmar.to_dict(), "patch_nums": (1, 2, 4)})
    vae, model, vae_p, params = _models()
    other_vae, _ = build({**cfg.vae.to_dict(), "patch_nums": (1, 2, 4)}, {})
    with pytest.raises(ValueError, match=r"HMAR patch_nums \(1, 2, 3, 4\) != VQVAE patch_nums \(1, 2, 4\)"):
        HMARSampler(model, other_vae, HMARSampling(mask_schedule=SCHEDULE))
    sampler = HMARSampler(model, vae, HMARSampling(mask_schedule=SCHEDULE))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        sampler(params, vae_p, [3, 11], jax.random.key(0))
    with pytest.raises(ValueError, match=r"HMARConfig.attn_mask='scale_causal'"):
        build(cfg.vae, {**cfg.hmar.to_dict(), "attn_mask": "scale_causal"})
    with pytest.raises(ValueError, match=r"HMARConfig.mask_layers=4 must be in \[1, depth=3\]"):
        build(cfg.vae, {**cfg.hmar.to_dict(), "mask_layers": 4})


def test_stage_order_and_dependencies():
    cfg = _config()
    cfg.stages = ("tokenizer", "mask")
    with pytest.raises(ValueError, match=r"stage 'mask' starts from stage 'generator'.s params; add 'generator'"):
        check_config(cfg)
    cfg.stages = ("tokenizer", "mask", "generator")
    with pytest.raises(ValueError, match=r"each must be one of \('tokenizer', 'generator', 'mask'\), in that order"):
        check_config(cfg)


def test_a_converted_checkpoint_of_another_depth(tmp_path):
    """Sampling a saved HMAR with a config of another depth: one error, before compiling, naming the field."""
    cfg = _config()
    vae, model, vae_p, params = _models()
    sections = {"vae": cfg.vae.to_dict(), "hmar": dict(cfg.hmar.to_dict(), **dataclasses.asdict(model.config))}
    save_pretrained(tmp_path / "ckpt", {"vae": vae_p, "hmar": params}, {"family": "hmar", **sections})
    deeper = dict(sections, hmar=dict(sections["hmar"], depth=5))
    _, other = build(cfg.vae, deeper["hmar"])
    with pytest.raises(
        ValueError, match=r"does not fit the config .*differs from this config in hmar.depth: 3 \(config: 5\)"
    ):
        load_pretrained(tmp_path / "ckpt", param_shapes(FAMILY, vae, other), family="hmar", sections=deeper)
