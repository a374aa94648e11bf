"""Converter: the released key lists, key/shape errors, the CLI and the Orbax round trip."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.convert import __main__ as convert_cli
from jaxgen.convert.common import ConversionError, count_params, load_state_dict, unwrap_state_dict
from jaxgen.convert.var import (
    convert_var,
    convert_vqvae,
    infer_var_config,
    plan_var,
    plan_vqvae,
    var_param_shapes,
    vqvae_param_shapes,
)
from jaxgen.families.var import build as build_var
from jaxgen.models.layer_stack import unrolled
from jaxgen.pretrained import load_pretrained
from jaxgen.sample import sample_grid
from tests.helpers import VAR_FIXTURE_A, VAR_FIXTURES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.needs_fixture(VAR_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


def _released(name):
    d = json.loads((VAR_FIXTURES / name).read_text())
    return d, {k: tuple(s) for k, s, _ in d["state_dict"]}


@pytest.mark.parametrize("variant", ["d16", "d20", "d24", "d30", "d36"])
def test_released_var_keys_map_onto_the_config(variant):
    meta, shapes = _released(f"released_var_{variant}_keys.json")
    cfg = load_config(f"{REPO / 'configs/var_imagenet.py'}:{variant}")
    _, var = build_var(cfg.vae, cfg.var)
    steps = plan_var(shapes, var.config)
    buffers = set(meta["buffers"])
    assert {s.key for s in steps} == set(shapes) - buffers  # every parameter is used, buffers are accounted for
    expected = var_param_shapes(var.config)
    assert count_params(expected) == meta["num_parameters"]
    assert sum(int(np.prod(shapes[s.key])) for s in steps) == meta["num_parameters"]
    assert var.config.shared_aln == (variant == "d36")
    # The config inferred from the keys alone is the same model.
    inferred = infer_var_config(
        shapes,
        patch_nums=var.config.patch_nums,
        cond_drop_rate=var.config.cond_drop_rate,
        drop_path_rate=var.config.drop_path_rate,
    )
    assert inferred == unrolled(var.config)  # the recipe scans its blocks; the checkpoint's layout is unrolled


def test_released_vqvae_keys_map_onto_the_config():
    meta, shapes = _released("released_vqvae_ch160v4096z32_keys.json")
    cfg = load_config(str(REPO / "configs/var_imagenet.py:d16"))
    vae, _ = build_var(cfg.vae, cfg.var)
    steps = plan_vqvae(shapes, vae.config)
    assert {s.key for s in steps} == set(shapes) - set(meta["buffers"])
    buffer_elems = sum(int(np.prod(shapes[b])) for b in meta["buffers"])
    assert count_params(vqvae_param_shapes(vae.config)) == meta["num_elements"] - buffer_elems
    from jaxgen.models.tokenizers.quantizers import phi_schedule

    assert list(phi_schedule(4, 10)) == meta["phi_index_per_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_d36_keys_with_the_512px_vqvae():
    cfg = load_config(str(REPO / "configs/var_imagenet.py:d36"))
    vae, var = build_var(cfg.vae, cfg.var)
    assert vae.config.image_size == 512 and var.config.seq_len == 2240
    _, shapes = _released("released_vqvae_ch160v4096z32_keys.json")
    shapes["quantize.ema_vocab_hit_SV"] = (10, 4096)
    plan_vqvae(shapes, vae.config)  # the same VQVAE weights serve 512 px


@pytest.fixture(scope="module")
def fixture_state():
    return load_state_dict(VAR_FIXTURE_A, "vae/"), load_state_dict(VAR_FIXTURE_A, "var/")


@pytest.fixture(scope="module")
def configs():
    meta = json.loads(VAR_FIXTURE_A.with_suffix(".json").read_text())
    from jaxgen.convert.var import var_configs_from_fixture

    return var_configs_from_fixture(meta)


def test_missing_unexpected_and_misshaped_keys_are_named(fixture_state, configs):
    _, var_sd = fixture_state
    _, var_cfg = configs
    sd = dict(var_sd)
    del sd["blocks.1.ffn.fc2.bias"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["head.weight"] = np.zeros((65, 64), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_var(sd, var_cfg)
    msg = str(e.value)
    assert "blocks_1/ffn/fc2/bias" in msg and "missing" in msg
    assert "blocks.0.attn.extra" in msg and "unexpected" in msg
    assert "head.weight (65, 64)" in msg and "mis-shaped" in msg


def test_checkpoint_of_another_depth_says_which(configs):
    _, shapes = _released("released_var_d20_keys.json")
    cfg = load_config(str(REPO / "configs/var_imagenet.py:d16"))
    _, var = build_var(cfg.vae, cfg.var)
    with pytest.raises(ConversionError, match=r"VAR-d20 .* configs/var_imagenet.py:d20"):
        plan_var(shapes, var.config)


def test_nonzero_k_bias_and_wrong_levels_are_rejected(fixture_state, configs):
    _, var_sd = fixture_state
    _, var_cfg = configs
    sd = dict(var_sd, **{"blocks.0.attn.zero_k_bias": np.ones(64, np.float32)})
    with pytest.raises(ConversionError, match="zero_k_bias"):
        convert_var(sd, var_cfg)
    sd = dict(var_sd, lvl_1L=np.zeros((1, 30), np.int64))
    with pytest.raises(ConversionError, match="patch_nums"):
        convert_var(sd, var_cfg)


def test_wrappers_are_unwrapped_and_unknown_ones_named():
    sd = {"a.weight": np.zeros(2)}
    assert unwrap_state_dict({"model": sd}) == sd
    assert unwrap_state_dict({"module": {"state_dict": sd}}) == sd
    with pytest.raises(ConversionError, match="unknown checkpoint wrapper"):
        unwrap_state_dict({"weights_here": sd, "epoch": 3})


def test_cli_converts_pth_and_safetensors_to_a_checkpoint_the_sampler_loads(tmp_path, fixture_state, configs):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    vae_sd, var_sd = fixture_state
    torch.save({"model": {k: torch.from_numpy(v) for k, v in var_sd.items()}}, tmp_path / "var.pth")
    save_file(vae_sd, tmp_path / "vae.safetensors")
    rc = convert_cli.main(
        ["var", "--vae", str(tmp_path / "vae.safetensors"), "--var", str(tmp_path / "var.pth"),
         "--out", str(tmp_path / "ckpt"), "--config", str(REPO / "configs/var_tiny.py")]
    )  # fmt: skip
    assert rc == 0
    vae_cfg, var_cfg = configs
    config, params = load_pretrained(tmp_path / "ckpt")
    assert config["var"]["depth"] == var_cfg.depth and tuple(config["vae"]["patch_nums"]) == vae_cfg.patch_nums
    np.testing.assert_array_equal(  # the same weights as converting in memory
        params["vae"]["quantize"]["embedding"]["embedding"],
        convert_vqvae(vae_sd, vae_cfg)["quantize"]["embedding"]["embedding"],
    )
    # The sampling binary loads the checkpoint; greedy sampling reproduces the official tokens.
    cfg = load_config(str(REPO / "configs/var_tiny.py"))
    with np.load(VAR_FIXTURE_A) as f:
        cfg.checkpoint = str(tmp_path / "ckpt")
        cfg.grid.classes, cfg.grid.per_class = tuple(int(c) for c in f["in/gen_labels"]), 1
        cfg.sampling.update(cfg=1.5, top_k=1, top_p=0.0)
        sample_grid(cfg, tmp_path / "samples")
        with np.load(tmp_path / "samples" / "samples.npz") as ours:
            for k in range(len(var_cfg.patch_nums)):
                np.testing.assert_array_equal(ours[f"indices_s{k}"], f[f"out/infer_idx_s{k}"])
            np.testing.assert_allclose(ours["images"], np.transpose(f["out/infer_img"], (0, 2, 3, 1)), atol=1e-4)


def test_cli_reports_a_bad_checkpoint_without_a_traceback(tmp_path, fixture_state, capsys):
    vae_sd, var_sd = fixture_state
    np.savez(tmp_path / "vae.npz", **vae_sd)
    np.savez(tmp_path / "var.npz", **{k: v for k, v in var_sd.items() if k != "head.bias"})
    rc = convert_cli.main(
        ["var", "--vae", str(tmp_path / "vae.npz"), "--var", str(tmp_path / "var.npz"), "--out", str(tmp_path / "ckpt")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"missing .*head/bias", err) and "Traceback" not in err


def test_loading_a_checkpoint_into_another_depth_is_a_clear_error(tmp_path, fixture_state, configs):
    from jaxgen.pretrained import save_pretrained

    _, var_sd = fixture_state
    _, var_cfg = configs
    save_pretrained(tmp_path / "ckpt", {"var": convert_var(var_sd, var_cfg)}, {"family": "var"})
    import dataclasses

    deeper = var_param_shapes(dataclasses.replace(var_cfg, depth=3))
    with pytest.raises(ValueError, match=r"missing: \['var/blocks_2"):
        load_pretrained(tmp_path / "ckpt", {"var": deeper})
