"""LlamaGen end to end: the golden check (tokenizer + GPT + sampler), the VQ-16 key list, the converter CLI with
upstream's checkpoint wrappers, CFG / cfg_interval in the scan sampler, and the sampling binary."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.convert import __main__ as convert_cli
from jaxgen.convert import verify
from jaxgen.convert.common import ConversionError, count_params, load_state_dict
from jaxgen.convert.llamagen import convert_vq, infer_vq_config, plan_vq, vq_param_shapes
from jaxgen.families import FAMILIES, param_shapes
from jaxgen.families.llamagen import build as build_llamagen
from jaxgen.sample import sample_grid
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling
from tests.helpers import SHARED, random_params

REPO = Path(__file__).resolve().parents[1]
LLAMAGEN = SHARED / "fixtures" / "llamagen"
FIXTURE_A = LLAMAGEN / "llamagen_fixture_A.npz"
needs_fixture = pytest.mark.needs_fixture(FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


# scan_layers=True: the same fixture through the scanned generator (converted params stacked)
@needs_fixture
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_fixture_a_matches_official_outputs(tmp_path, capsys, scan):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "llamagen", str(FIXTURE_A), "--dump", str(dump)] + ["--scan-layers"] * scan)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], {k: v for k, v in report["outputs"].items() if not v["ok"]}
    with np.load(FIXTURE_A) as ref, np.load(dump) as ours:
        out_keys = sorted(k for k in ref.files if k.startswith("out/"))
        assert len(out_keys) == 15 and sorted(ours.files) == out_keys
        for k in out_keys:
            assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
            if np.issubdtype(ref[k].dtype, np.integer):
                np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
            else:  # README: 1e-4 covers the reference's own CPU/thread variation (<= 1.9e-5 on convolutions)
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-4 * max(1.0, np.abs(ref[k]).max()), err_msg=k)


@needs_fixture
def test_released_vq16_keys_map_onto_the_config():
    meta = json.loads((LLAMAGEN / "released_state_dict_shapes.json").read_text())["VQ-16"]
    shapes = {k: tuple(v) for k, v in meta["state_dict"].items()}
    vq, _ = build_llamagen(load_config(str(REPO / "configs/llamagen_imagenet.py:B")).vq,
                           load_config(str(REPO / "configs/llamagen_imagenet.py:B")).gpt)  # fmt: skip
    steps = plan_vq(shapes, vq.config)
    # q/k/v are packed into one conv per attention block: 3 keys -> 1 per weight and per bias.
    n_attn = sum(1 for k in shapes if k.endswith(".q.weight"))
    assert len(steps) == len(shapes) - 1 - 4 * n_attn  # minus codebook_used
    # num_parameters counts parameters only; the codebook_used buffer is not one.
    assert count_params(vq_param_shapes(vq.config)) == meta["num_parameters"]
    assert infer_vq_config(shapes) == vq.config


@needs_fixture
def test_vq_converter_names_a_broken_attention_block_and_a_misshaped_conv():
    sd = load_state_dict(FIXTURE_A, "vq/")
    cfg = infer_vq_config({k: v.shape for k, v in sd.items()})
    broken = {k: v for k, v in sd.items() if k != "encoder.conv_blocks.4.attn.1.k.weight"}
    with pytest.raises(ConversionError, match=r"encoder\.conv_blocks\.4\.attn\.1: attention needs q, k and v"):
        convert_vq(broken, cfg)
    bad = dict(sd, **{"decoder.conv_out.weight": np.zeros((3, 16, 3, 3), np.float32)})
    with pytest.raises(ConversionError, match=r"mis-shaped.*decoder\.conv_out\.weight"):
        convert_vq(bad, cfg)


@needs_fixture
def test_cli_with_upstream_wrappers_then_the_sampling_binary_reproduces_official_tokens(tmp_path):
    torch = pytest.importorskip("torch")
    with np.load(FIXTURE_A) as f:
        vq_sd = {k[3:]: torch.from_numpy(f[k]) for k in f.files if k.startswith("vq/")}
        gpt_sd = {k[4:]: torch.from_numpy(f[k]) for k in f.files if k.startswith("gpt/")}
        gen_labels, want = f["in/gen_labels"], f["out/gen_cfg_indices"]
        want_images = np.transpose(f["out/gen_cfg_images"], (0, 2, 3, 1))
    torch.save({"model": vq_sd}, tmp_path / "vq.pt")  # upstream's VQ checkpoints: checkpoint["model"]
    torch.save({"module": gpt_sd}, tmp_path / "gpt.pt")  # DeepSpeed-style GPT checkpoint
    rc = convert_cli.main(["llamagen", "--vq", str(tmp_path / "vq.pt"), "--gpt", str(tmp_path / "gpt.pt"),
                           "--out", str(tmp_path / "ckpt"), "--block-size", "16"])  # fmt: skip
    assert rc == 0
    meta = json.loads(FIXTURE_A.with_suffix(".json").read_text())["sampling"]
    cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
    cfg.checkpoint = str(tmp_path / "ckpt")
    cfg.grid.classes, cfg.grid.per_class = tuple(int(c) for c in gen_labels), 1
    cfg.sampling.update(cfg_scale=meta["cfg_scale"], top_k=meta["top_k"], top_p=meta["top_p"])
    sample_grid(cfg, tmp_path / "samples")
    with np.load(tmp_path / "samples" / "samples.npz") as ours:
        np.testing.assert_array_equal(ours["tokens"], want)
        np.testing.assert_allclose(ours["images"], (np.clip(want_images, -1, 1) + 1) / 2, atol=1e-4)


def test_cli_rejects_an_unknown_wrapper_and_a_vocab_mismatch(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", a=np.zeros(1))
    torch = pytest.importorskip("torch")
    torch.save({"weights": {"a.weight": torch.zeros(2)}, "step": 3}, tmp_path / "odd.pt")
    rc = convert_cli.main(["llamagen", "--vq", str(tmp_path / "odd.pt"), "--gpt", str(tmp_path / "odd.pt"),
                           "--out", str(tmp_path / "ckpt")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "unknown checkpoint wrapper" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"gpt\.vocab_size=100 disagrees with the tokenizer \(64\)"):
        cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
        cfg.gpt.vocab_size = 100
        build_llamagen(cfg.vq, cfg.gpt)


@functools.lru_cache(maxsize=2)
def _tiny(cfg_interval: int = -1):
    cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
    cfg.vq.ch_mult, cfg.vq.num_res_blocks = (1, 2), 1  # a 2x tokenizer: the images are not the point here
    vq, gpt = build_llamagen(cfg.vq, cfg.gpt)
    shapes = param_shapes(FAMILIES["llamagen"], vq, gpt)
    return vq, gpt, random_params(shapes["vq"], 0), random_params(shapes["gpt"], 1)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(gpt, params, labels, tokens):
    return gpt.apply({"params": params}, labels, tokens[:, :-1])


@pytest.mark.parametrize("cfg_interval", [-1, 3])
def test_scan_sampler_guides_exactly_the_steps_upstream_does(cfg_interval):
    """Each step's logits equal teacher forcing on the sampled tokens: guided (uncond + s (cond - uncond)) for the
    prefill and decode steps i <= cfg_interval, the plain conditional logits after."""
    vq, gpt, vq_params, gpt_params = _tiny()
    scale = 3.0
    sampler = NextTokenSampler(gpt, vq, NextTokenSampling(cfg_scale=scale, cfg_interval=cfg_interval, top_k=8,
                                                          temperature=1.3, return_logits=True))  # fmt: skip
    labels = jnp.array([2, 7, 10])
    out = sampler(gpt_params, vq_params, labels, jax.random.key(3))
    assert out.tokens.shape == (3, 16) and out.tokens.dtype == jnp.int32
    null = jnp.full_like(labels, gpt.config.num_classes)
    cond = _teacher_forced(gpt, gpt_params, labels, out.tokens)
    uncond = _teacher_forced(gpt, gpt_params, null, out.tokens)
    guided = uncond + (cond - uncond) * scale
    step = np.arange(16) - 1  # the prefill is step -1, decode step i predicts token i + 1
    use_guided = (step <= cfg_interval) | (cfg_interval == -1)
    expected = np.where(use_guided[None, :, None], guided, cond)
    # float32; the cached path attends over a preallocated, masked cache: ~1e-6 observed
    np.testing.assert_allclose(out.step_logits, expected, atol=2e-5)
    assert float(jnp.abs(guided - cond).max()) > 0.1  # guidance really changes the logits here


def test_one_compile_and_reproducible_keys():
    vq, gpt, vq_params, gpt_params = _tiny()
    sampler = NextTokenSampler(gpt, vq, NextTokenSampling(cfg_scale=2.0, top_k=0, top_p=0.9))
    a = sampler(gpt_params, vq_params, [1, 2], jax.random.key(0))
    b = sampler(gpt_params, vq_params, [3, 4], jax.random.key(1))
    c = sampler(gpt_params, vq_params, [1, 2], jax.random.key(0))
    assert sampler._fn._cache_size() == 1
    assert not np.array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, c.tokens)
    assert a.images.shape == (2, 8, 8, 3) and float(a.images.min()) >= 0 and float(a.images.max()) <= 1


def test_sampler_rejects_bad_labels_and_a_mismatched_tokenizer():
    vq, gpt, vq_params, gpt_params = _tiny()
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        NextTokenSampler(gpt, vq)(gpt_params, vq_params, [11], jax.random.key(0))
    cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
    cfg.vq.codebook_size, cfg.gpt.vocab_size = 32, 32
    other_vq, _ = build_llamagen(cfg.vq, cfg.gpt)
    with pytest.raises(ValueError, match="predicts 64 token ids but the tokenizer has 32 codes"):
        NextTokenSampler(gpt, other_vq)
