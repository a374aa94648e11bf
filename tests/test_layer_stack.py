"""Scanned block stacks (`scan_layers`) against the unrolled loop: same params, same outputs, gradients and samples;
the param layout converts at the boundary (checkpoints, converters), remat policies keep the gradients."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.families import family_models, model_sections, param_shapes
from jaxgen.families.hmar import start_mask_stage
from jaxgen.models.layer_stack import REMAT_POLICIES, match_layout, stack_layers, unstack_layers
from jaxgen.pretrained import load_pretrained, save_pretrained
from tests.helpers import random_params

REPO = Path(__file__).resolve().parents[1]
# generator families whose blocks can scan, with their digits config and the generator's depth field
SCANNING = {
    "var": ("digits_var", "depth"),
    "hmar": ("digits_hmar", "depth"),
    "llamagen": ("digits_llamagen", "n_layer"),
    "maskgit": ("digits_maskgit", "num_layers"),
}
# float32: the scanned body is the same block, but XLA fuses it in another context, so sums can reassociate.
# Tolerance relative to each array's largest value; measured on CPU: <= 1.2e-6 (MaskGIT's logits, |ref| ~ 20 with
# these random weights), <= 1e-7 for the others, on logits and gradients.
ATOL = 1e-5


def _models(family_name: str, scan_layers: bool, remat: str = "none", depth: int = 3):
    """(family, tokenizer, generator) of the family's digits config, `depth` blocks, the given layout."""
    config_name, depth_field = SCANNING[family_name]
    config = load_config(str(REPO / f"configs/{config_name}.py"))
    family, sections = model_sections(config)
    gen = dict(sections[family.generator_key], scan_layers=scan_layers, remat=remat, **{depth_field: depth})
    if family_name == "hmar":
        gen["mask_layers"] = 2  # one shared block, two per branch
    return (family, *family_models(family, {**sections, family.generator_key: gen}))


def _loss(family, generator, params, inputs):
    logits = generator.apply({"params": params}, *inputs)
    return jnp.sum(jnp.tanh(logits) * jnp.linspace(-1, 1, logits.shape[-1]))


# ---- the layout at the boundary -------------------------------------------------------------------------------------
def test_match_layout_stacks_numbered_blocks_and_leaves_other_numbered_names():
    layer = lambda v: {"attn": {"kernel": np.full((2, 3), v, np.float32)}, "ln": {"scale": np.full((3,), v)}}
    unrolled = {"Embed_0": {"table": np.ones((4, 3))}, **{f"blocks_{i}": layer(i) for i in range(3)}}
    like = {"Embed_0": {"table": 0}, "blocks": {"attn": {"kernel": 0}, "ln": {"scale": 0}}}
    stacked = match_layout(unrolled, like)
    assert sorted(stacked) == ["Embed_0", "blocks"]  # the single numbered module (upstream's name) is untouched
    assert stacked["blocks"]["attn"]["kernel"].shape == (3, 2, 3)
    np.testing.assert_array_equal(stacked["blocks"]["ln"]["scale"][:, 0], [0, 1, 2])
    back = match_layout(stacked, unrolled)
    assert sorted(back) == sorted(unrolled)
    for i in range(3):
        np.testing.assert_array_equal(back[f"blocks_{i}"]["attn"]["kernel"], unrolled[f"blocks_{i}"]["attn"]["kernel"])
    assert match_layout(unrolled, unrolled) == unrolled  # same layout: nothing moves
    assert stack_layers(unstack_layers(stacked, "blocks"), "blocks")["blocks"]["attn"]["kernel"].shape == (3, 2, 3)


def test_bad_layer_stack_fields_are_named():
    from jaxgen.models.generators.next_scale import NextScaleConfig

    with pytest.raises(ValueError, match=r"NextScaleConfig.remat='some'.*one of"):
        NextScaleConfig(remat="some")
    with pytest.raises(ValueError, match=r"scan_layers='yes' must be True or False"):
        NextScaleConfig(scan_layers="yes")
    assert set(REMAT_POLICIES) == {"none", "full", "dots", "dots_no_batch"}


# ---- same outputs and gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", sorted(SCANNING))
def test_scanned_stack_equals_the_unrolled_loop(family_name):
    """The unrolled model's random params, stacked, give the scanned model the same logits and (through remat) the
    same gradients, unstacked back."""
    family, _, unrolled = _models(family_name, scan_layers=False)
    _, _, scanned = _models(family_name, scan_layers=True, remat="full")
    inputs = family.generator_inputs(unrolled)
    inputs = jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), inputs)
    if family_name == "maskgit":  # ids: the class token, then codes with a few masked
        inputs = (jnp.asarray(np.random.default_rng(0).integers(-1, 16, inputs[0].shape), jnp.int32),)
    elif inputs[0].dtype == jnp.int32 and inputs[0].ndim == 1:
        inputs = (jnp.asarray([1, 3], jnp.int32), *inputs[1:])
    params = random_params(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), *inputs))["params"])
    stacked = match_layout(params, jax.eval_shape(lambda: scanned.init(jax.random.key(0), *inputs))["params"])
    assert set(stacked) != set(params)  # the blocks really are stacked
    ours = scanned.apply({"params": stacked}, *inputs)
    ref = unrolled.apply({"params": params}, *inputs)
    assert float(jnp.std(ref)) > 0.1
    np.testing.assert_allclose(ours, ref, atol=ATOL * max(1.0, float(jnp.abs(ref).max())), rtol=0)
    g_ref = jax.grad(lambda p: _loss(family, unrolled, p, inputs))(params)
    g_ours = match_layout(jax.grad(lambda p: _loss(family, scanned, p, inputs))(stacked), params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_ours), strict=True):
        np.testing.assert_allclose(b, a, atol=ATOL * max(1.0, float(jnp.abs(a).max())), rtol=0, err_msg=str(path))


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_remat_policies_keep_the_gradients(remat):
    """VAR with drop path in training: every policy recomputes the same values (same rng per block)."""
    family, _, plain = _models("var", scan_layers=True)
    _, _, rematted = _models("var", scan_layers=True, remat=remat)
    plain = plain.clone(config=dataclasses.replace(plain.config, drop_path_rate=0.2))
    rematted = rematted.clone(config=dataclasses.replace(rematted.config, drop_path_rate=0.2))
    inputs = jax.tree.map(lambda a: jnp.repeat(a, 4, axis=0), family.generator_inputs(plain))
    params = random_params(jax.eval_shape(lambda: plain.init(jax.random.key(0), *inputs))["params"])

    def loss(model, p):
        logits = model.apply({"params": p}, *inputs, train=True, rngs={"dropout": jax.random.key(7)})
        return jnp.sum(jnp.tanh(logits))

    g1, g2 = jax.grad(lambda p: loss(plain, p))(params), jax.grad(lambda p: loss(rematted, p))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, atol=ATOL * max(1.0, float(jnp.abs(a).max())), rtol=0)


@pytest.mark.parametrize("family_name", sorted(SCANNING))
def test_scanned_sampler_draws_the_same_samples(family_name):
    """The family's own sampler (KV cache for VAR and LlamaGen, HMAR's refinement, MaskGIT's parallel decode) with
    the scanned generator: the same ids with the same key, and the same images."""
    config_name, _ = SCANNING[family_name]
    config = load_config(str(REPO / f"configs/{config_name}.py"))
    outs = []
    for scan in (False, True):
        family, tokenizer, generator = _models(family_name, scan_layers=scan, depth=2)
        shapes = param_shapes(family, tokenizer, generator)
        if not scan:
            params = {k: random_params(v, seed=i) for i, (k, v) in enumerate(shapes.items())}
        gen = match_layout(params[family.generator_key], shapes[family.generator_key])
        sampler = family.sampler(generator, tokenizer, config.sampling.to_dict())
        out = sampler(gen, params[family.tokenizer_key], jnp.asarray([0, 3, 7], jnp.int32), jax.random.key(3))
        outs.append(out)
    ids = [np.concatenate([np.asarray(v).reshape(3, -1) for _, v in sorted(o.token_arrays().items())], 1) for o in outs]
    np.testing.assert_array_equal(ids[1], ids[0])
    assert len(np.unique(ids[0])) > 3  # real draws, not a constant
    np.testing.assert_allclose(outs[1].images, outs[0].images, atol=1e-5)


def test_hmar_mask_stage_starts_from_the_scanned_next_scale_branch():
    family, _, model = _models("hmar", scan_layers=True)
    inputs = family.generator_inputs(model)
    params = random_params(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"])
    fresh = random_params(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"], seed=5)
    start = start_mask_stage(fresh, params)
    fc1 = lambda tree, name: tree[name]["ffn"]["fc1"]["kernel"]
    np.testing.assert_array_equal(fc1(start, "mask_blocks"), fc1(params, "ns_blocks"))
    np.testing.assert_array_equal(start["mask_embed"]["embedding"], fresh["mask_embed"]["embedding"])


def test_checkpoints_load_into_either_layout(tmp_path):
    """A checkpoint written unrolled (what the converters write) loads into a scanned config and back."""
    family, tokenizer, unrolled = _models("llamagen", scan_layers=False)
    _, _, scanned = _models("llamagen", scan_layers=True)
    shapes = param_shapes(family, tokenizer, unrolled)
    params = {k: random_params(v, seed=i) for i, (k, v) in enumerate(shapes.items())}
    save_pretrained(tmp_path / "ckpt", params, {"family": family.name})
    _, loaded = load_pretrained(tmp_path / "ckpt", param_shapes(family, tokenizer, scanned), family=family.name)
    k = loaded[family.generator_key]["layers"]["attention"]["wqkv"]["kernel"]
    assert k.shape[0] == 3
    np.testing.assert_array_equal(k[2], params[family.generator_key]["layers_2"]["attention"]["wqkv"]["kernel"])
    save_pretrained(tmp_path / "scanned", loaded, {"family": family.name})
    _, back = load_pretrained(tmp_path / "scanned", shapes, family=family.name)
    np.testing.assert_array_equal(back["gpt"]["layers_1"]["feed_forward"]["w2"]["kernel"],
                                  params["gpt"]["layers_1"]["feed_forward"]["w2"]["kernel"])  # fmt: skip


def test_binary_trains_scanned_and_samples_unrolled(tmp_path):
    """The main job's smoke run with the scanned, rematerialised VAR (sharded over 8 devices); its export (stacked
    params) samples with the unrolled config through `jaxgen.sample`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    main = [sys.executable, "-m", "jaxgen.main", "--config=configs/digits_var.py:smoke", f"--workdir={workdir}",
            "--config.var.scan_layers=True", "--config.var.remat=dots_no_batch"]  # fmt: skip
    proc = subprocess.run(main, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["generator"]["num_nonfinite"] == 0
    export = json.loads((workdir / "generator" / "export" / "config.json").read_text())
    assert export["var"]["scan_layers"] is True
    sample = [sys.executable, "-m", "jaxgen.sample", "--config=configs/digits_var.py:smoke",
              f"--config.checkpoint={workdir}", f"--workdir={tmp_path / 'samples'}"]  # fmt: skip
    proc = subprocess.run(sample, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "samples" / "grid.png").is_file()
