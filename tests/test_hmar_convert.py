"""HMAR converter: the released key lists (shapes only), the fixture's teacher forcing through the converted weights,
the training-class mapping, the CLI hook and the errors for checkpoints that do not fit."""

import argparse
import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.common import ConversionError, count_params, load_state_dict
from jaxgen.convert.hmar import (
    add_convert_arguments,
    convert_checkpoints,
    convert_hmar,
    convert_pair,
    hmar_configs_from_fixture,
    hmar_from_training_dicts,
    hmar_param_shapes,
    infer_hmar_config,
    plan_hmar,
)
from jaxgen.convert.var import infer_vqvae_config, plan_vqvae, vqvae_param_shapes
from jaxgen.models.generators.hmar import HMARConfig, HMARTransformer, in_mask_branch
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from tests.helpers import SHARED, VAR_FIXTURE_A, VAR_FIXTURES

HMAR_FIXTURES = SHARED / "fixtures" / "hmar"
HMAR_FIXTURE_A = HMAR_FIXTURES / "hmar_fixture_A.npz"
pytestmark = pytest.mark.needs_fixture(HMAR_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


def _rel_err(got, ref) -> float:
    """max |got - ref| / max(1, |ref|): the fixture README's suggested measure (tolerance 1e-4)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


def _released_hmar(variant):
    d = json.loads((HMAR_FIXTURES / f"released_hmar_{variant}_keys.json").read_text())
    return d, {k: tuple(v["shape"]) for k, v in d["keys"].items()}


def _config_of_build(build) -> HMARConfig:
    """The HMARConfig of a released key list's `build` record."""
    return HMARConfig(
        vocab_size=build["V"],
        z_channels=build["Cvae"],
        num_classes=build["num_classes"],
        depth=build["depth"],
        embed_dim=build["embed_dim"],
        num_heads=build["num_heads"],
        shared_aln=build["shared_aln"],
        attn_l2_norm=build["attn_l2_norm"],
        patch_nums=tuple(build["patch_nums"]),
        mask_layers=build["n_layers_train"],
        cond_drop_rate=build["cond_drop_rate"],
        drop_path_rate=build["drop_path_rate"],
    )


# ---- released key lists (shapes only: nothing is allocated) ------------------------------------------------------
@pytest.mark.parametrize("variant", ["d16", "d20", "d24", "d30"])
def test_released_hmar_keys_map_onto_the_inferred_config(variant):
    meta, shapes = _released_hmar(variant)
    b = meta["build"]
    cfg = infer_hmar_config(
        shapes,
        patch_nums=tuple(b["patch_nums"]),
        cond_drop_rate=b["cond_drop_rate"],
        drop_path_rate=b["drop_path_rate"],
    )
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mask_layers) == (
        b["depth"], b["embed_dim"], b["num_heads"], b["n_layers_train"]
    )  # fmt: skip
    assert (cfg.vocab_size, cfg.z_channels, cfg.num_classes, cfg.shared_aln) == (
        b["V"], b["Cvae"], b["num_classes"], b["shared_aln"]
    )  # fmt: skip
    assert cfg.base_layers == meta["n_base_blocks"] and cfg.mask_layers == meta["n_ns_blocks"] == meta["n_mask_blocks"]
    assert cfg == _config_of_build(b)

    steps = plan_hmar(shapes, cfg)
    buffers = {k for k, v in meta["keys"].items() if v["kind"] == "buffer"}
    assert buffers == {"lvl_1L", "attn_bias_for_masking"} | {k for k in shapes if k.endswith("attn.zero_k_bias")}
    assert {s.key for s in steps} == set(shapes) - buffers  # every parameter is used, the buffers accounted for
    assert len(shapes) == meta["n_state_dict_entries"]

    # the plan covers every leaf of hmar_param_shapes(cfg) once, so its Flax shapes count the jaxgen params
    assert len({s.path for s in steps}) == len(steps)
    assert sum(int(np.prod(s.shape)) for s in steps) == meta["n_parameters"]
    assert sum(int(np.prod(shapes[s.key])) for s in steps) == meta["n_parameters"]
    # the next-scale path (everything but the mask branch) is the VAR model of the same depth, param for param
    ns_path = sum(int(np.prod(s.shape)) for s in steps if not in_mask_branch(s.path[0]))
    assert ns_path == meta["n_parameters_next_scale_path"]


def test_released_vqvae_keys_map_onto_the_inferred_config():
    meta = json.loads((VAR_FIXTURES / "released_vqvae_ch160v4096z32_keys.json").read_text())
    shapes = {k: tuple(s) for k, s, _ in meta["state_dict"]}
    ctor = meta["ctor"]
    vae_cfg = infer_vqvae_config(shapes, ctor["v_patch_nums"])
    assert (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.ch, vae_cfg.share_quant_resi) == (
        ctor["vocab_size"], ctor["z_channels"], ctor["ch"], ctor["share_quant_resi"]
    )  # fmt: skip
    assert vae_cfg.ch_mult == tuple(ctor["ch_mult"]) and vae_cfg.num_res_blocks == ctor["num_res_blocks"]
    steps = plan_vqvae(shapes, vae_cfg)
    assert {s.key for s in steps} == set(shapes) - set(meta["buffers"])
    buffer_elems = sum(int(np.prod(shapes[b])) for b in meta["buffers"])
    assert count_params(vqvae_param_shapes(vae_cfg)) == meta["num_elements"] - buffer_elems
    # the released HMAR checkpoints' scales are this VQVAE's
    hmar_meta, _ = _released_hmar("d16")
    assert tuple(hmar_meta["build"]["patch_nums"]) == vae_cfg.patch_nums


# ---- fixture A: convert, then teacher forcing --------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta():
    return json.loads(HMAR_FIXTURE_A.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def state():
    return load_state_dict(HMAR_FIXTURE_A, "vae/"), load_state_dict(HMAR_FIXTURE_A, "hmar/")


@pytest.fixture(scope="module")
def configs(meta):
    return hmar_configs_from_fixture(meta)


@pytest.fixture(scope="module")
def converted(state, configs):
    vae_sd, hmar_sd = state
    return convert_pair(vae_sd, hmar_sd, *configs)


@pytest.fixture(scope="module")
def arrays():
    with np.load(HMAR_FIXTURE_A) as f:
        return {k: f[k] for k in f.files if k.startswith(("in/", "out/"))}


@pytest.fixture(scope="module")
def tf_inputs(arrays, configs, converted):
    vae_cfg, _ = configs
    vae = MultiScaleVQVAE(vae_cfg)
    idx = [jnp.asarray(arrays[f"out/vae_idx_s{k}"], jnp.int32) for k in range(len(vae_cfg.patch_nums))]
    p = {"params": converted["vae"]}
    ns = vae.apply(p, idx, method=MultiScaleVQVAE.teacher_forcing_input)
    own = vae.apply(p, idx, method=MultiScaleVQVAE.own_scale_input)
    return ns, own


def test_fixture_configs_are_the_ones_read_off_the_weights(meta, state, configs):
    vae_sd, hmar_sd = state
    vae_cfg, hmar_cfg = configs
    c = meta["config"]
    assert (hmar_cfg.depth, hmar_cfg.mask_layers, hmar_cfg.embed_dim) == (
        c["depth"],
        c["n_layers_train"],
        c["embed_dim"],
    )
    assert hmar_cfg.patch_nums == vae_cfg.patch_nums == tuple(c["patch_nums"])
    inferred = infer_hmar_config(  # patch_nums from the lvl_1L array
        hmar_sd, cond_drop_rate=hmar_cfg.cond_drop_rate, drop_path_rate=hmar_cfg.drop_path_rate
    )
    assert inferred == hmar_cfg
    assert infer_vqvae_config({k: v.shape for k, v in vae_sd.items()}, hmar_cfg.patch_nums) == vae_cfg
    n_weights = sum(v.size for k, v in hmar_sd.items() if not re.search(r"lvl_1L|attn_bias_for_masking|zero_k_bias", k))
    assert count_params(hmar_param_shapes(hmar_cfg)) == n_weights


def test_teacher_forcing_inputs_match(arrays, tf_inputs):
    ns, own = tf_inputs
    err_ns, err_own = _rel_err(ns, arrays["out/ns_input"]), _rel_err(own, arrays["out/mask_input"])
    print(f"ns_input max rel err {err_ns:.2e}, mask_input {err_own:.2e}")
    assert err_ns < 1e-4 and err_own < 1e-4


def test_next_scale_logits_match(arrays, configs, converted, tf_inputs):
    _, hmar_cfg = configs
    labels = jnp.asarray(arrays["in/labels"], jnp.int32)  # includes the null class
    assert int(labels.max()) == hmar_cfg.num_classes
    logits = HMARTransformer(hmar_cfg).apply({"params": converted["hmar"]}, labels, tf_inputs[0])
    err = _rel_err(logits, arrays["out/nsp_logits"])
    print(f"nsp_logits max rel err {err:.2e} (max abs {np.max(np.abs(logits - arrays['out/nsp_logits'])):.2e})")
    assert err < 1e-4


def test_masked_prediction_logits_match(arrays, configs, converted, tf_inputs):
    _, hmar_cfg = configs
    labels = jnp.asarray(arrays["in/labels"], jnp.int32)
    masked = np.zeros((1, hmar_cfg.seq_len - hmar_cfg.first_l), bool)  # indices into the L - 1 rows, whole batch
    masked[0, arrays["in/mp_idx_to_mask"]] = True
    assert masked.sum() == arrays["in/mp_idx_to_mask"].size
    ns, own = tf_inputs
    logits = HMARTransformer(hmar_cfg).apply(
        {"params": converted["hmar"]}, labels, ns, own, jnp.asarray(masked), method=HMARTransformer.masked_forward
    )
    err = _rel_err(logits, arrays["out/mp_logits"])
    print(f"mp_logits max rel err {err:.2e} (max abs {np.max(np.abs(logits - arrays['out/mp_logits'])):.2e})")
    assert err < 1e-4


# ---- training-class checkpoints ------------------------------------------------------------------------------------
def _training_dicts(meta, hmar_sd):
    maps = meta["training_class_key_maps"]
    return ({k: hmar_sd[v] for k, v in maps["nsp"].items()}, {k: hmar_sd[v] for k, v in maps["mp"].items()})


def test_training_dicts_assemble_the_released_layout(meta, state, configs):
    _, hmar_sd = state
    nsp, mp = _training_dicts(meta, hmar_sd)
    assert "blocks.0.attn.mat_qkv.weight" in nsp and "word_embed.bias" in nsp and "mask_embed.weight" in mp
    out = hmar_from_training_dicts(nsp, mp, configs[1].mask_layers)
    assert set(out) == set(hmar_sd)
    for k, v in hmar_sd.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)

    if configs[1].base_layers:  # a frozen (shared) block that moved in stage 2
        bad = dict(mp, **{"blocks.0.ffn.fc1.bias": mp["blocks.0.ffn.fc1.bias"] + 1})
        with pytest.raises(ConversionError, match=re.escape("differs from stage 1's base_blocks.0.ffn.fc1.bias")):
            hmar_from_training_dicts(nsp, bad, configs[1].mask_layers)
    with pytest.raises(ConversionError, match="pass the dicts in the order stage 1, stage 2"):
        hmar_from_training_dicts(mp, nsp, configs[1].mask_layers)


# ---- the CLI hook ----------------------------------------------------------------------------------------------------
def test_convert_checkpoints_reads_sizes_off_the_files(tmp_path, meta, state, configs, converted):
    vae_sd, hmar_sd = state
    np.savez(tmp_path / "vae.npz", **vae_sd)
    np.savez(tmp_path / "hmar.npz", **hmar_sd)
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    params, cfg = convert_checkpoints(
        parser.parse_args(["--vae", str(tmp_path / "vae.npz"), "--hmar", str(tmp_path / "hmar.npz")])
    )
    assert cfg["family"] == "hmar" and set(params) == {"vae", "hmar"}
    vae_cfg, hmar_cfg = configs
    assert cfg["vae"] == dataclasses.asdict(vae_cfg)
    assert HMARConfig(**cfg["hmar"]) == dataclasses.replace(hmar_cfg, cond_drop_rate=0.1, drop_path_rate=0.0)
    np.testing.assert_array_equal(
        params["hmar"]["mask_embed"]["embedding"], converted["hmar"]["mask_embed"]["embedding"]
    )

    nsp, mp = _training_dicts(meta, hmar_sd)  # the two training stages instead of the released layout
    np.savez(tmp_path / "nsp.npz", **nsp)
    np.savez(tmp_path / "mp.npz", **mp)
    args = ["--vae", str(tmp_path / "vae.npz"), "--nsp", str(tmp_path / "nsp.npz"), "--mp", str(tmp_path / "mp.npz")]
    params2, cfg2 = convert_checkpoints(parser.parse_args([*args, "--mask-layers", str(hmar_cfg.mask_layers)]))
    assert cfg2 == cfg
    np.testing.assert_array_equal(params2["hmar"]["ns_head"]["kernel"], params["hmar"]["ns_head"]["kernel"])

    np.savez(tmp_path / "nolvl.npz", **{k: v for k, v in hmar_sd.items() if k != "lvl_1L"})
    with pytest.raises(ConversionError, match=r"no lvl_1L buffer .* pass --config"):
        convert_checkpoints(
            parser.parse_args(["--vae", str(tmp_path / "vae.npz"), "--hmar", str(tmp_path / "nolvl.npz")])
        )


_CONFIG_FILE = """
import ml_collections


def get_config(arg=""):
    cfg = ml_collections.ConfigDict()
    cfg.family = "hmar"
    cfg.vae = {vae!r}
    cfg.hmar = {hmar!r}
    return cfg
"""


def test_cli_with_a_config_writes_a_checkpoint_and_checks_the_scales(tmp_path, state, configs, converted):
    from jaxgen.convert import __main__ as convert_cli
    from jaxgen.pretrained import load_pretrained

    vae_sd, hmar_sd = state
    vae_cfg, hmar_cfg = configs
    np.savez(tmp_path / "vae.npz", **vae_sd)
    np.savez(tmp_path / "hmar.npz", **hmar_sd)
    vae_kw = {k: v for k, v in dataclasses.asdict(vae_cfg).items() if k != "dtype"}
    hmar_kw = {
        k: v for k, v in dataclasses.asdict(hmar_cfg).items() if k not in ("vocab_size", "z_channels", "patch_nums")
    }
    (tmp_path / "cfg.py").write_text(_CONFIG_FILE.format(vae=vae_kw, hmar=hmar_kw))
    files = ["--vae", str(tmp_path / "vae.npz"), "--hmar", str(tmp_path / "hmar.npz")]
    rc = convert_cli.main(["hmar", *files, "--config", str(tmp_path / "cfg.py"), "--out", str(tmp_path / "ckpt")])
    assert rc == 0
    config, params = load_pretrained(tmp_path / "ckpt")
    assert config["family"] == "hmar" and HMARConfig(**config["hmar"]) == hmar_cfg
    np.testing.assert_array_equal(params["hmar"]["mask_head"]["kernel"], converted["hmar"]["mask_head"]["kernel"])

    other = dict(vae_kw, patch_nums=vae_cfg.patch_nums[:-1])  # a VQVAE config with other scales than the HMAR file
    (tmp_path / "other.py").write_text(_CONFIG_FILE.format(vae=other, hmar=hmar_kw))
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    with pytest.raises(ConversionError) as e:
        convert_checkpoints(parser.parse_args([*files, "--config", str(tmp_path / "other.py")]))
    want = f"the VQVAE's patch_nums {other['patch_nums']} differ from the HMAR transformer's {hmar_cfg.patch_nums}"
    assert want in _one_line(e) and "lvl_1L" in str(e.value)


# ---- checkpoints that do not fit ---------------------------------------------------------------------------------
def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_checkpoint_of_another_depth_names_both():
    _, shapes = _released_hmar("d20")
    d16, _ = _released_hmar("d16")
    with pytest.raises(ConversionError) as e:
        plan_hmar(shapes, _config_of_build(d16["build"]))
    hint = str(e.value).splitlines()[-1]
    assert re.search(r"HMAR-d20 .*12 base \+ 8 ns \+ 8 mask.* config is depth 16 .* configs/hmar_imagenet.py:d20", hint)


def test_missing_and_misshaped_keys_are_named(state, configs):
    _, hmar_sd = state
    _, cfg = configs
    sd = dict(hmar_sd)
    last = cfg.mask_layers - 1
    del sd[f"mask_blocks.{last}.ffn.fc2.bias"]
    sd["ns_head.weight"] = np.zeros((cfg.vocab_size + 1, cfg.embed_dim), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_hmar(sd, cfg)
    msg = str(e.value)  # common.plan_conversion's report: a header, then one line per kind
    assert "missing" in msg and f"mask_blocks_{last}/ffn/fc2/bias" in msg
    assert "mis-shaped" in msg and f"ns_head.weight ({cfg.vocab_size + 1}, {cfg.embed_dim})" in msg


@pytest.mark.needs_fixture(VAR_FIXTURE_A)
def test_a_var_checkpoint_given_as_hmar_says_so(configs):
    _, cfg = configs
    var_sd = load_state_dict(VAR_FIXTURE_A, "var/")
    with pytest.raises(ConversionError) as e:
        convert_hmar(var_sd, cfg)
    msg = _one_line(e)
    assert "is a VAR transformer (its attn_bias_for_masking is VAR's block-causal mask)" in msg
    assert "python -m jaxgen.convert var" in msg and "hmar_from_training_dicts" in msg
    with pytest.raises(ConversionError, match="is a VAR transformer: it has VAR's keys"):  # shapes only
        infer_hmar_config({k: v.shape for k, v in var_sd.items()})


def test_a_training_checkpoint_given_as_hmar_says_which(meta, state, configs):
    nsp, mp = _training_dicts(meta, state[1])
    for sd, stage in ((nsp, "stage-1 NextScalePrediction"), (mp, "stage-2 MaskedPrediction")):
        with pytest.raises(ConversionError) as e:
            convert_hmar(sd, configs[1])
        assert f"an HMAR training checkpoint, upstream's {stage}" in _one_line(e)


def test_mismatched_patch_nums_and_buffers_are_rejected(state, configs):
    vae_sd, hmar_sd = state
    vae_cfg, cfg = configs
    other = dataclasses.replace(vae_cfg, patch_nums=cfg.patch_nums[:-1])
    with pytest.raises(ConversionError) as e:
        convert_pair(vae_sd, hmar_sd, other, cfg)
    want = f"the VQVAE's patch_nums {other.patch_nums} differ from the HMAR transformer's {cfg.patch_nums}"
    assert want in _one_line(e)

    L = cfg.seq_len
    sd = dict(hmar_sd, lvl_1L=np.zeros((1, L), np.int64))
    with pytest.raises(ConversionError) as e:
        convert_hmar(sd, cfg)
    assert f"lvl_1L has [{L}] tokens per scale" in _one_line(e)

    lvl = hmar_sd["lvl_1L"].reshape(-1)
    causal = np.where(lvl[None, :] <= lvl[:, None], 0.0, -np.inf).astype(np.float32).reshape(1, 1, L, L)
    with pytest.raises(ConversionError) as e:
        convert_hmar(dict(hmar_sd, attn_bias_for_masking=causal), cfg)
    assert "VAR's block-causal mask" in _one_line(e) and "this is a VAR checkpoint" in str(e.value)
    with pytest.raises(ConversionError, match="is not HMAR's block-diagonal mask"):
        convert_hmar(dict(hmar_sd, attn_bias_for_masking=np.zeros((1, 1, L, L), np.float32)), cfg)

    sd = dict(hmar_sd, **{"ns_blocks.0.attn.zero_k_bias": np.ones(cfg.embed_dim, np.float32)})
    with pytest.raises(ConversionError, match="zero_k_bias must be all zeros"):
        convert_hmar(sd, cfg)

    n = cfg.mask_layers
    sd = {k: v for k, v in hmar_sd.items() if not k.startswith(f"mask_blocks.{n - 1}.")}
    with pytest.raises(ConversionError) as e:
        infer_hmar_config(sd)
    assert f"{n} ns_blocks but {n - 1} mask_blocks" in _one_line(e)
