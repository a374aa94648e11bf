"""LlamaGen GPT: RoPE tables, teacher-forced logits and greedy KV-cached decoding against the official code
(fixture A), the released key lists, KV-cache decode == full recompute, and the error messages."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.config_util import load_config
from jaxgen.convert.common import ConversionError, count_params, load_state_dict
from jaxgen.convert.llamagen import (
    check_vocab,
    convert_gpt,
    gpt_param_shapes,
    infer_gpt_config,
    plan_gpt,
)
from jaxgen.models.generators.next_token import (
    NextTokenConfig,
    NextTokenTransformer,
    init_cache,
)
from jaxgen.models.layer_stack import unrolled
from jaxgen.models.layers import apply_rope, rope_1d_table, rope_2d_table, token_cross_entropy
from tests.helpers import SHARED, random_params

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "llamagen_imagenet.py"
LLAMAGEN = SHARED / "fixtures" / "llamagen"
FIXTURE_A = LLAMAGEN / "llamagen_fixture_A.npz"
needs_fixture = pytest.mark.needs_fixture(FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure

# The released c2i GPTs (upstream GPT_models): dim, n_layer, n_head. configs/llamagen_imagenet.py holds the same.
RELEASED_GPT = {"GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20)}

# Teacher-forced logits: float32 on both sides with the same op order up to reduction order; we measure ~1.5e-6 and
# the fixture's own cross-machine rerun moved the logits by 2.6e-6, so 1e-4 (the fixture README's tolerance) leaves
# a wide margin while still catching any layout error (those move logits by O(1)).
LOGIT_TOL = 1e-4


def _forward(model, params, labels, tokens, **kw):
    """Teacher forcing, jitted (an eager first call compiles every op separately: ~4x slower on CPU)."""
    return jax.jit(model.apply, static_argnames=("train",))({"params": params}, labels, tokens, **kw)


# ---- fixture A --------------------------------------------------------------------------------------------------
def _fixture_config(meta) -> NextTokenConfig:
    """NextTokenConfig from the fixture JSON's upstream ModelArgs (sizes are never hard-coded here)."""
    args = meta["gpt_model_args"]
    fields = {f.name for f in dataclasses.fields(NextTokenConfig)}
    kw = {k: v for k, v in args.items() if k in fields}
    return NextTokenConfig(**kw)


@pytest.fixture(scope="module")
def fixture_a():
    meta = json.loads(FIXTURE_A.with_suffix(".json").read_text())
    with np.load(FIXTURE_A) as f:
        arrays = {k: f[k] for k in f.files if not k.startswith("vq/")}
    config = _fixture_config(meta)
    sd = load_state_dict(FIXTURE_A, "gpt/")
    return meta, arrays, config, sd, convert_gpt(sd, config)


@needs_fixture
def test_rope_2d_table_matches_upstream(fixture_a):
    _, f, config, _, _ = fixture_a
    ref = f["out/gpt_freqs_cis"]
    table = rope_2d_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
    assert table.dtype == np.float32 and table.shape == ref.shape
    np.testing.assert_array_equal(table[: config.cls_token_num], 0.0)  # the class row: cos = sin = 0
    np.testing.assert_allclose(table, ref, rtol=0, atol=1.2e-7)  # measured: 6e-8 (1 ulp of cos/sin)
    np.testing.assert_array_equal(config.rope_table(), table)


@needs_fixture
def test_teacher_forced_logits_and_loss_match_upstream(fixture_a):
    meta, f, config, _, params = fixture_a
    assert config.ffn_hidden == meta["gpt_derived"]["ffn_hidden_dim"]
    assert config.class_rows == meta["gpt_derived"]["cls_embedding_rows"]
    assert config.null_class == meta["gpt_derived"]["null_class_index"]
    model = NextTokenTransformer(config)
    tokens = jnp.asarray(f["in/gpt_tokens"], jnp.int32)
    logits = _forward(model, params, jnp.asarray(f["in/gpt_labels"], jnp.int32), tokens[:, :-1])
    ref = f["out/gpt_logits"]
    assert logits.shape == ref.shape and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_TOL * max(1.0, float(np.abs(ref).max())))
    np.testing.assert_allclose(token_cross_entropy(logits, tokens), f["out/gpt_loss"], rtol=1e-5)


def _greedy(model, params, labels_b, steps: int):
    """Greedy KV-cached decoding in one jitted scan: (tokens [B, steps], per-step logits [B, steps, V])."""
    cache = init_cache(model.config, labels_b.shape[0])
    logits, cache = model.apply({"params": params}, labels_b, cache, method=model.prefill)

    def body(carry, pos):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt, cache = model.apply({"params": params}, token, pos, cache, method=model.decode_step)
        return (nxt, cache), (token, logits)

    (last, _), (tokens, step_logits) = jax.lax.scan(body, (logits, cache), jnp.arange(1, steps, dtype=jnp.int32))
    tokens = jnp.concatenate([tokens.T, jnp.argmax(last, -1)[:, None].astype(jnp.int32)], axis=1)
    return tokens, jnp.concatenate([jnp.swapaxes(step_logits, 0, 1), last[:, None]], axis=1)


@needs_fixture
def test_greedy_kv_cached_decoding_matches_upstream(fixture_a):
    _, f, config, _, params = fixture_a
    model = NextTokenTransformer(config)
    run = jax.jit(lambda p, lab: _greedy(model, p, lab, config.block_size))
    tokens, step_logits = run(params, jnp.asarray(f["in/gen_labels"], jnp.int32))
    np.testing.assert_array_equal(tokens, f["out/gen_nocfg_indices"])
    ref = f["out/gen_nocfg_step_logits"]
    np.testing.assert_allclose(step_logits, ref, rtol=0, atol=LOGIT_TOL * max(1.0, float(np.abs(ref).max())))


@needs_fixture
def test_config_inferred_from_the_fixture_keys(fixture_a):
    _, _, config, sd, _ = fixture_a
    shapes = {k: v.shape for k, v in sd.items()}
    assert infer_gpt_config(shapes, n_head=config.n_head, block_size=config.block_size) == config


# ---- the released key lists ---------------------------------------------------------------------------------------
def _released_gpt(name):
    d = json.loads((LLAMAGEN / "released_state_dict_shapes.json").read_text())[name]
    return d, {k: tuple(s) for k, s in d["state_dict"].items()}


@needs_fixture
@pytest.mark.parametrize("name", sorted(RELEASED_GPT))
def test_released_gpt_keys_map_onto_the_config(name):
    meta, shapes = _released_gpt(name)
    variant = name.removeprefix("GPT-")
    cfg = load_config(f"{CONFIG_FILE}:{variant}_256")
    config = unrolled(NextTokenConfig(**cfg.gpt.to_dict()))  # the recipe scans its layers; checkpoints are unrolled
    assert (config.dim, config.n_layer, config.n_head) == RELEASED_GPT[name]
    assert RELEASED_GPT[name] == (meta["dim"], meta["n_layer"], meta["n_head"])
    assert (config.head_dim, config.ffn_hidden) == (meta["head_dim"], meta["ffn_hidden_dim"])
    assert config.rope_table().shape == tuple(meta["freqs_cis_shape_not_in_state_dict"])
    steps = plan_gpt(shapes, config)
    assert {s.key for s in steps} == set(shapes)  # every tensor is a parameter and is used
    assert count_params(gpt_param_shapes(config)) == meta["num_parameters"]
    assert sum(int(np.prod(shapes[s.key])) for s in steps) == meta["num_parameters"]
    # n_head is not in the shapes: the inferred config takes it from upstream's size table.
    assert infer_gpt_config(shapes) == config
    # A checkpoint that carries the RoPE table still plans (the entry is accounted for).
    plan_gpt({**shapes, "freqs_cis": tuple(meta["freqs_cis_shape_not_in_state_dict"])}, config)


def test_config_file_variants():
    for variant, (dim, n_layer, n_head), size in [
        ("B", (768, 12, 12), 256),
        ("XXL", (1536, 48, 24), 384),
        ("3B", (3200, 24, 32), 384),
        ("L_384", (1024, 24, 16), 384),
    ]:
        cfg = load_config(f"{CONFIG_FILE}:{variant}")
        config = NextTokenConfig(**cfg.gpt.to_dict())
        assert (config.dim, config.n_layer, config.n_head) == (dim, n_layer, n_head)
        assert cfg.image_size == size and config.block_size == (size // 16) ** 2
        check_vocab(config, cfg.vq["codebook_size"])
    assert NextTokenConfig(**load_config(f"{CONFIG_FILE}:3B").gpt.to_dict()).ffn_hidden == 8704
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(f"{CONFIG_FILE}:M")


# ---- KV cache == full recompute ---------------------------------------------------------------------------------
def _random_model(seed=0, **kw):
    config = NextTokenConfig(
        **{**dict(vocab_size=32, num_classes=5, dim=64, n_layer=2, n_head=4, multiple_of=32, block_size=16), **kw}
    )
    return NextTokenTransformer(config), random_params(gpt_param_shapes(config), seed)


@pytest.mark.parametrize(
    "kw",
    [dict(n_kv_head=2), dict(n_kv_head=1, rope_2d=False, block_size=12), dict(n_kv_head=None)],
    ids=["gqa-2d", "mqa-1d", "mha-2d"],
)
def test_kv_cached_decoding_equals_full_recompute(kw):
    model, params = _random_model(**kw)
    c = model.config
    rng = np.random.default_rng(1)
    labels = jnp.asarray([0, c.null_class, 3], jnp.int32)
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (3, c.block_size)), jnp.int32)
    full = _forward(model, params, labels, tokens[:, :-1])  # [B, block_size, V]

    @jax.jit
    def decode(params, labels, tokens):
        cache = init_cache(c, labels.shape[0], c.seq_len + 5)  # longer than needed: the tail must stay masked
        first, cache = model.apply({"params": params}, labels, cache, method=model.prefill)

        def body(cache, xs):
            token, pos = xs
            logits, cache = model.apply({"params": params}, token, pos, cache, method=model.decode_step)
            return cache, logits

        positions = jnp.arange(1, c.block_size, dtype=jnp.int32)
        _, rest = jax.lax.scan(body, cache, (tokens[:, :-1].T, positions))
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    cached = decode(params, labels, tokens)
    assert cached.shape == full.shape
    # float32, same math, different reduction lengths (masked cache slots); measured ~1e-6 on logits of size ~5.
    np.testing.assert_allclose(cached, full, rtol=0, atol=2e-5)


def test_decode_step_compiles_once_for_every_position():
    model, params = _random_model(n_kv_head=2)
    c = model.config
    step = jax.jit(lambda p, t, pos, cache: model.apply({"params": p}, t, pos, cache, method=model.decode_step))
    cache = model.init_cache(2)  # the module method needs no params
    assert len(cache) == c.n_layer and cache[0][0].shape == (2, c.kv_heads, c.seq_len, c.head_dim)
    tok = jnp.zeros((2,), jnp.int32)
    for pos in (1, 2, 7):
        logits, cache = step(params, tok, jnp.int32(pos), cache)
    assert logits.shape == (2, c.vocab_size) and step._cache_size() == 1
    # Slots written so far are non-zero, later ones still zero.
    assert bool(jnp.all(cache[0][0][:, :, 8:] == 0)) and bool(jnp.any(cache[0][0][:, :, 7] != 0))


# bfloat16 compute (8 mantissa bits, ~4e-3 relative rounding per op) vs float32 on the same weights, 2 blocks, random
# labels and tokens: measured max |diff| 6.3e-3 .. 7.9e-3 of the largest |logit| (3.3-3.9) over 8 param / input seeds.
# Asserted: < 2.5e-2 of it (3x the worst seed), and > 1e-4 (float32 on both sides would differ by ~1e-7: bf16 is on).
BF16_LOGIT_TOL = 2.5e-2


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, params = _random_model(dtype="bfloat16", n_kv_head=2)
    c = model.config
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, c.num_classes, (4,)), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, c.vocab_size, (4, c.block_size - 1)), jnp.int32)
    logits = _forward(model, params, labels, tokens)
    ref = _forward(model.clone(config=dataclasses.replace(c, dtype="float32")), params, labels, tokens)
    assert logits.dtype == jnp.float32 and init_cache(c, 2)[0][0].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    err = float(jnp.abs(logits - ref).max() / jnp.abs(ref).max())
    assert 1e-4 < err < BF16_LOGIT_TOL, err


def test_label_dropout_only_in_training():
    model, params = _random_model(class_dropout_prob=1.0)  # always drop: every label becomes the null class
    labels, tokens = jnp.asarray([0, 1], jnp.int32), jnp.ones((2, 3), jnp.int32)
    dropped = _forward(model, params, labels, tokens, train=True, rngs={"dropout": jax.random.key(0)})
    null = _forward(model, params, jnp.full((2,), model.config.null_class, jnp.int32), tokens)
    np.testing.assert_allclose(dropped, null, atol=1e-6)
    assert not np.allclose(_forward(model, params, labels, tokens), null)


def test_rope_rotates_adjacent_pairs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 8)), jnp.float32)
    table = rope_1d_table(3, 8, 10000.0)
    out = np.asarray(apply_rope(x, table))
    z = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])  # pairs (2m, 2m+1) as complex numbers
    rot = z * (table[:, None, :, 0] + 1j * table[:, None, :, 1])
    np.testing.assert_allclose(out[..., 0::2], rot.real, atol=1e-6)
    np.testing.assert_allclose(out[..., 1::2], rot.imag, atol=1e-6)
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=0)  # position 0: angle 0 (no class rows here)
    assert rope_1d_table(3, 8, cls_token_num=1).shape == (4, 4, 2)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_sequence_too_long_and_wrong_rank_are_clear_errors():
    model, params = _random_model()
    c = model.config
    labels = jnp.zeros((2,), jnp.int32)
    _forward(model, params, labels, jnp.zeros((2, c.block_size), jnp.int32))  # the longest that fits
    with pytest.raises(ValueError, match=rf"longer than the {c.num_positions} .*block_size"):
        model.apply({"params": params}, labels, jnp.zeros((2, c.block_size + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"image tokens \[B, T\]"):
        model.apply({"params": params}, labels, jnp.zeros((2, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="cache entries"):
        model.apply({"params": params}, labels, init_cache(c, 3), method=model.prefill)


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        NextTokenConfig(dim=100, n_head=12)
    with pytest.raises(ValueError, match="not a multiple of n_kv_head"):
        NextTokenConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ValueError, match="not a square grid"):
        NextTokenConfig(block_size=200)
    NextTokenConfig(block_size=200, rope_2d=False)
    with pytest.raises(ValueError, match="exactly one class token"):
        NextTokenConfig(cls_token_num=120)


@needs_fixture
def test_checkpoint_of_another_size_says_which():
    _, shapes = _released_gpt("GPT-L")
    with pytest.raises(ConversionError, match=r"24 layers, dim 1024 \(GPT-L\).*configs/llamagen_imagenet.py:L"):
        plan_gpt(shapes, NextTokenConfig())  # GPT-B


@needs_fixture
def test_missing_unexpected_and_misshaped_keys_are_named(fixture_a):
    _, _, config, sd, _ = fixture_a
    bad = dict(sd)
    del bad["layers.1.feed_forward.w3.weight"]
    bad["layers.0.attention.extra"] = np.zeros(3, np.float32)
    bad["output.weight"] = np.zeros((65, config.dim), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_gpt(bad, config)
    msg = str(e.value)
    assert "layers_1/feed_forward/w3/kernel" in msg and "missing" in msg
    assert "layers.0.attention.extra" in msg and "unexpected" in msg
    assert f"output.weight (65, {config.dim})" in msg and "mis-shaped" in msg


@needs_fixture
def test_freqs_cis_and_kv_cache_buffers_are_accounted_for(fixture_a):
    _, f, config, sd, params = fixture_a
    shape = (2, 1, config.kv_heads, config.head_dim)
    extra = {
        "freqs_cis": f["out/gpt_freqs_cis"],
        "layers.0.attention.kv_cache.k_cache": np.zeros(shape, np.float32),
        "layers.0.attention.kv_cache.v_cache": np.zeros(shape, np.float32),
    }
    converted = convert_gpt({**sd, **extra}, config)
    np.testing.assert_array_equal(converted["norm"]["scale"], params["norm"]["scale"])
    with pytest.raises(ConversionError, match=r"freqs_cis .*block_size"):
        convert_gpt({**sd, "freqs_cis": rope_2d_table(6, config.head_dim)}, config)


def test_vocab_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"vocab_size 16384 != tokenizer codebook_size 8192.*gpt.vocab_size = 8192"):
        check_vocab(NextTokenConfig(), 8192)
    check_vocab(NextTokenConfig(), 16384)


def test_infer_rejects_an_ffn_width_off_the_rule():
    torch_shapes = {
        "tok_embeddings.weight": (64, 64),
        "cls_embedding.embedding_table.weight": (11, 64),
        "layers.0.attention.wqkv.weight": (192, 64),
        "layers.0.feed_forward.w1.weight": (512, 64),
    }
    with pytest.raises(ConversionError, match=r"FFN width is 512 .* gives 256"):
        infer_gpt_config(torch_shapes, n_head=4)
    assert infer_gpt_config(torch_shapes, n_head=4, ffn_dim_multiplier=3.0).ffn_hidden == 512
    gqa = {**torch_shapes, "layers.0.attention.wqkv.weight": (96, 64), "layers.0.feed_forward.w1.weight": (256, 64)}
    assert infer_gpt_config(gqa, n_head=4).n_kv_head == 1
