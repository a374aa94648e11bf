"""MaskGIT decoding against the official code (fixture A, ../shared/fixtures/maskgit): the mask schedules bit for
bit, both decode runs token for token and step by step from the same key, the decoded images; editing, start_iter,
guidance and top-k on their invariants; every bad input a one-line ValueError before anything compiles."""

import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from jaxgen.sampling.guidance import guide_from_uncond
from jaxgen.sampling.mask_schedule import check_schedule, masked_count, schedule
from jaxgen.sampling.masked import MaskedSampler, MaskedSampling, parallel_decode, transformer_logits, typed_key
from tests.helpers import SHARED, random_params

jax.config.update("jax_default_matmul_precision", "highest")  # (conftest sets it too) float32-exact vs the fixture

FIXTURE_A = SHARED / "fixtures" / "maskgit" / "maskgit_fixture_A.npz"
needs_fixture = pytest.mark.needs_fixture(FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure

# Float trace arrays (logits, confidence): float32 on both sides, same ops up to matmul reduction order; the test
# bound is FLOAT_TOL * max(1, |ref|). Measured worst (both runs): logits 6.0e-6 abs (4.9e-6 rel), confidence 3.3e-6
# abs; the Gumbel noise and the schedule values are bit-identical. Images (identical tokens, so only the tokenizer's
# float noise): measured 2.2e-5 on the [0, 1] scale, 2.9e-5 for the raw [-1, 1] output; 1e-4 is the README's value.
FLOAT_TOL = 1e-4
RUNS = {"t4.5": 4.5, "t0": 0.0}
EXACT = ("ids", "mask_len", "masking", "gumbel_sample", "gumbel_choice", "mask_ratio")
CLOSE = ("logits", "confidence")


@pytest.fixture(scope="module")
def fx():
    """The fixture: arrays, JSON, the transformer and tokenizer modules with their loaded params."""
    meta = json.loads(FIXTURE_A.with_suffix(".json").read_text())
    with np.load(FIXTURE_A) as f:
        z = {k: f[k] for k in f.files}
    cfg, t, tc = meta["config"], meta["transformer_ctor"], meta["tokenizer_config"]
    tf = MaskedTransformer(MaskedConfig(
        codebook_size=cfg["codebook_size"], num_classes=cfg["num_class"], num_tokens=meta["derived"]["num_tokens"],
        hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        intermediate_size=t["intermediate_size"],
    ))  # fmt: skip
    tok = MaskGITVQ(MaskGITVQConfig(
        codebook_size=tc["codebook_size"], embedding_dim=tc["embedding_dim"], filters=tc["filters"],
        channel_multipliers=tuple(tc["channel_multipliers"]), num_res_blocks=tc["num_res_blocks"],
    ))  # fmt: skip

    def tree(prefix, rename=None):
        flat = {tuple(k.split("/")[1:]): jnp.asarray(v) for k, v in z.items() if k.startswith(prefix)}
        flat = {(rename.get(k, k) if rename else k): v for k, v in flat.items()}
        return flax.traverse_util.unflatten_dict(flat)

    tf_params = tree("transformer/")
    tok_params = tree("tokenizer/", {("quantizer", "codebook"): ("quantizer", "embedding", "embedding")})
    return dict(z=z, meta=meta, tf=tf, tok=tok, tf_params=tf_params, tok_params=tok_params)


def _settings(fx, **kw) -> MaskedSampling:
    d = fx["meta"]["decode"]
    return MaskedSampling(num_iter=d["num_iter"], start_iter=d["start_iter"], schedule=d["mask_scheduling_method"],
                          **kw)  # fmt: skip


def _decode(tf, params, init_ids, key, settings, start_iter=None):
    """parallel_decode on the transformer (class labels read off column 0), jitted."""
    guided = settings.guided

    def run(p, ids, k):
        fn = transformer_logits(tf, p, ids[:, 0] - tf.config.codebook_size, guided)
        return parallel_decode(fn, ids, k, settings, tf.config.codebook_size, start_iter)

    return jax.jit(run)(params, jnp.asarray(init_ids), key)


@pytest.fixture(scope="module")
def replays(fx):
    """Both official runs replayed from `in/dec_init_ids` and the raw key `in/dec_rng_key`."""
    z = fx["z"]
    init, key = z["in/dec_init_ids"], jnp.asarray(z["in/dec_rng_key"])
    settings = {r: _settings(fx, choice_temperature=ct, return_steps=True) for r, ct in RUNS.items()}
    return {r: _decode(fx["tf"], fx["tf_params"], init, key, s) for r, s in settings.items()}


def _check_trace(final_seqs, trace, init_ids, settings, start_iter, k):
    """The trace is self-consistent, step for step, with upstream's algorithm (numpy re-derivation)."""
    fs, init = np.asarray(final_seqs), np.asarray(init_ids)
    tr = {f: np.asarray(getattr(trace, f)) for f in trace.__dataclass_fields__}
    n0 = (init == -1).sum(-1)
    for t in range(settings.num_iter):
        if t < start_iter:
            np.testing.assert_array_equal(fs[:, t], init)
            assert all(not tr[f][t].any() for f in tr), f"trace row {t} before start_iter is not zeros"
            continue
        ids = tr["step_ids"][t]
        np.testing.assert_array_equal(
            ids, init if t == start_iter else np.where(tr["step_masking"][t - 1], -1, fs[:, t - 1])
        )
        unknown = ids == -1
        draw = np.argmax(tr["step_logits"][t] + tr["step_gumbel_sample"][t], -1)
        np.testing.assert_array_equal(fs[:, t], np.where(unknown, draw, ids))
        ratio = np.float32(t + 1) / np.float32(settings.num_iter)
        want_len = np.floor(n0.astype(np.float32) * np.asarray(schedule(ratio, n0, settings.schedule)))  # float32
        want_len = np.maximum(1, np.minimum(unknown.sum(-1) - 1, want_len))
        np.testing.assert_array_equal(tr["step_mask_len"][t], want_len)
        conf = tr["step_confidence"][t]
        assert np.all(np.isposinf(conf[~unknown])) and np.all(np.isfinite(conf[unknown]))
        cut = np.take_along_axis(np.sort(conf, -1), tr["step_mask_len"][t][:, None], -1)
        np.testing.assert_array_equal(tr["step_masking"][t], conf < cut)
    assert np.all((fs[:, -1, 1:] >= 0) & (fs[:, -1, 1:] < k)), "the last step must fill every token with a code"


# ---- mask schedules -------------------------------------------------------------------------------------------
@needs_fixture
def test_schedules_bit_exact_with_upstream(fx):
    z, methods = fx["z"], fx["meta"]["config"]["sched_methods"]
    n = fx["meta"]["derived"]["num_tokens"]
    for m in methods:
        out, ref = np.asarray(schedule(z["in/sched_ratios"], n, m)), z[f"out/sched_{m}"]
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32), err_msg=m)


def test_float32_floor_trap_in_the_decoder():
    """README: T = 12, step index 7, n0 * cos(pi/3) lands just below n0 / 2 in float32 (256 -> 127, 1024 -> 511)
    where float64 gives n0 / 2. One decode: row 0 starts with 256 masked tokens of 1024, row 1 with all 1024."""
    traps = {256: 127, 1024: 511}
    ratio = jnp.float32(8) / jnp.float32(12)
    for n, want in traps.items():
        assert math.floor(n * math.cos(math.pi / 2 * 8 / 12)) == n // 2  # the trap is real: float64 disagrees
        assert int(jnp.floor(jnp.int32(n) * schedule(ratio, n, "cosine"))) == want
    settings = MaskedSampling(num_iter=12, return_steps=True)  # choice noise: no confidence ties
    k, n = 4, max(traps)
    logits_fn = lambda ids: jnp.zeros((*ids.shape, k), jnp.float32)
    init = np.full((2, 1 + n), -1, np.int32)
    init[:, 0] = k
    init[0, 1 + min(traps) :] = 0  # row 0: only the first 256 image tokens to generate
    _, trace = jax.jit(lambda key: parallel_decode(logits_fn, init, key, settings, k))(jax.random.key(0))
    assert [int(x) for x in trace.step_mask_len[7]] == list(traps.values())


def test_schedule_names_and_masked_count():
    for ok in ("uniform", "cosine", "log", "exp", "pow1.5", "pow2", "pow3"):
        assert check_schedule(ok) == ok
    for bad in ("linear", "powx", "pow", "pow-1", "pownan", "Cosine"):
        with pytest.raises(ValueError, match=r"unknown mask schedule .*'cosine'.*pow<x>"):
            check_schedule(bad)
    r = jnp.array([0.0, 0.3, 0.5, 0.9, 0.999999], jnp.float32)
    for m in ("cosine", "uniform", "pow2", "log", "exp"):
        c = np.asarray(masked_count(r, 256, m))
        assert c.dtype == np.int32 and c.shape == (5,)
        first = 255 if m == "exp" else 256  # exp starts at 1 - 1/n
        assert c[0] == first and c[-1] == 1 and np.all(np.diff(c) <= 0), (m, c)
        np.testing.assert_array_equal(c, np.clip(np.ceil(np.asarray(schedule(r, 256, m)) * 256), 1, 256))
    assert int(masked_count(jnp.array([0.5]), 256, "cosine")[0]) == math.ceil(256 * math.cos(math.pi / 4))


# ---- fixture replay -------------------------------------------------------------------------------------------
@needs_fixture
@pytest.mark.parametrize("r", list(RUNS))
def test_decode_replays_upstream_step_by_step(fx, replays, r):
    z = fx["z"]
    final_seqs, trace = replays[r]
    np.testing.assert_array_equal(final_seqs, z[f"out/dec_{r}_final_seqs"])
    for name in EXACT + CLOSE:
        got, ref = np.asarray(getattr(trace, f"step_{name}")), z[f"out/dec_{r}_step_{name}"]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        if name in EXACT:
            np.testing.assert_array_equal(got, ref, err_msg=name)
        else:
            np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg=name)
            fin = np.isfinite(ref)
            np.testing.assert_array_less(np.abs(got[fin] - ref[fin]), FLOAT_TOL * np.maximum(1.0, np.abs(ref[fin])))
    assert [int(x) for x in trace.step_mask_len[:, 0]] == fx["meta"]["diagnostics"][f"decode_{r}"]["mask_len_per_step"]
    _check_trace(final_seqs, trace, z["in/dec_init_ids"], _settings(fx), 0, fx["tf"].config.codebook_size)


@pytest.fixture(scope="module")
def sampler(fx):
    """The fixture's t4.5 decode as a MaskedSampler, with the trace."""
    return MaskedSampler(fx["tf"], fx["tok"], _settings(fx, choice_temperature=4.5, return_steps=True))


@needs_fixture
def test_sampler_reproduces_upstream_images(fx, replays, sampler):
    z, tok, tp = fx["z"], fx["tok"], fx["tok_params"]
    decode01 = jax.jit(lambda p, ids: tok.apply({"params": p}, tok.apply({"params": p}, ids, method="codes"),
                                                method="decode_unit"))  # fmt: skip
    for r, (final_seqs, _) in replays.items():
        img = decode01(tp, final_seqs[:, -1, 1:])
        np.testing.assert_allclose(img, z[f"out/dec_{r}_image"], rtol=0, atol=FLOAT_TOL)  # measured 2.2e-5
    # the whole sampler from labels and a typed key (the replays above used the raw key: the same noise)
    labels, ref_seqs, ref_img = z["in/dec_labels"], z["out/dec_t4.5_final_seqs"], z["out/dec_t4.5_image"]
    s = sampler(fx["tf_params"], tp, labels, jax.random.key(7))
    np.testing.assert_array_equal(s.final_seqs, ref_seqs)
    np.testing.assert_array_equal(s.tokens, ref_seqs[:, -1, 1:])
    assert s.tokens.dtype == jnp.int32 and set(s.token_arrays()) == {"tokens"}
    np.testing.assert_array_equal(s.trace.step_ids[0], z["in/dec_init_ids"])
    np.testing.assert_array_equal(s.trace.step_masking, z["out/dec_t4.5_step_masking"])
    np.testing.assert_allclose(s.decoded, 2.0 * ref_img - 1.0, rtol=0, atol=2 * FLOAT_TOL)  # measured 2.9e-5
    np.testing.assert_allclose(s.images, np.clip(ref_img, 0.0, 1.0), rtol=0, atol=FLOAT_TOL)


def test_raw_and_typed_keys_are_the_same_key():
    raw = jax.random.PRNGKey(7)
    assert raw.dtype == jnp.uint32 and raw.shape == (2,)
    np.testing.assert_array_equal(jax.random.key_data(typed_key(raw)), jax.random.key_data(jax.random.key(7)))
    typed = jax.random.key(3)
    assert typed_key(typed) is typed


# ---- editing and start_iter -----------------------------------------------------------------------------------
@needs_fixture
def test_edit_keeps_given_tokens_and_fills_the_rest(fx, sampler):
    """Inpainting (regenerate the centre), outpainting (keep only the centre), and an all-mask canvas, which at
    start_iter 0 is plain generation (the fixture's run). start_iter is traced: one compile for every value."""
    z, c = fx["z"], fx["tf"].config
    k, n, g = c.codebook_size, c.num_tokens, math.isqrt(c.num_tokens)
    source = z["out/dec_t4.5_final_seqs"][:, -1, 1:]
    rows, cols = np.divmod(np.arange(n), g)
    centre = (abs(rows - (g - 1) / 2) < g / 4) & (abs(cols - (g - 1) / 2) < g / 4)
    assert 0 < centre.sum() < n
    canvas = np.stack([np.where(centre, -1, source[0]), np.where(centre, source[1], -1)]).astype(np.int32)
    labels = np.array([5, 2])  # row 0 regenerates its centre under another class
    key = jax.random.key(11)
    settings = sampler.settings
    results = {}
    for start in (settings.num_iter // 4, 0, settings.num_iter - 1):  # upstream's demo: 2 of 12
        s = sampler.edit(fx["tf_params"], fx["tok_params"], labels, canvas, key, start_iter=start)
        tokens = np.asarray(s.tokens)
        np.testing.assert_array_equal(tokens[canvas >= 0], canvas[canvas >= 0])
        assert np.all((tokens >= 0) & (tokens < k))
        init = np.concatenate([labels[:, None] + k, canvas], axis=1)
        _check_trace(s.final_seqs, s.trace, init, settings, start, k)
        assert s.images.shape == (2, *z["out/dec_t4.5_image"].shape[1:])
        assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
        results[start] = tokens
    assert not np.array_equal(results[0], results[settings.num_iter // 4])  # start_iter changes the decode
    blank = np.full_like(canvas, -1)
    s = sampler.edit(fx["tf_params"], fx["tok_params"], z["in/dec_labels"], blank, jax.random.key(7), 0)
    np.testing.assert_array_equal(s.final_seqs, z["out/dec_t4.5_final_seqs"])
    assert sampler._edit._cache_size() == 1


# ---- guidance and top-k (tiny random models) ------------------------------------------------------------------
def _tiny(class_dropout_prob=0.0, codebook_size=16):
    """A random 4x4-token MaskGIT (16 px images): (transformer, tokenizer, transformer params, tokenizer params)."""
    vq = MaskGITVQConfig(codebook_size=codebook_size, embedding_dim=8, filters=32, channel_multipliers=(1, 1, 1),
                         num_res_blocks=1)  # fmt: skip
    mc = MaskedConfig(codebook_size=16, num_classes=5, num_tokens=16, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, class_dropout_prob=class_dropout_prob)  # fmt: skip
    tok, tf = MaskGITVQ(vq), MaskedTransformer(mc)
    tok_shapes = jax.eval_shape(tok.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    tf_shapes = jax.eval_shape(tf.init, jax.random.key(0), tf.example_ids())["params"]
    return tf, tok, random_params(tf_shapes, 1), random_params(tok_shapes, 2)


TINY_LABELS, TINY_ITERS = np.array([1, 4, 0]), 6


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with a null class, and its plain decode (no guidance, no filter) of TINY_LABELS."""
    tf, tok, tp, kp = _tiny(class_dropout_prob=0.1)
    c = tf.config
    init = np.concatenate([TINY_LABELS[:, None] + c.codebook_size, np.full((3, c.num_tokens), -1)], axis=1)
    plain, _ = _decode(tf, tp, init, jax.random.key(3), MaskedSampling(num_iter=TINY_ITERS))
    logits = jax.jit(lambda p, ids: tf.apply({"params": p}, ids)[..., : c.codebook_size])
    return tf, tok, tp, kp, init, np.asarray(plain), lambda ids: np.asarray(logits(tp, ids))


def test_cfg_guides_against_the_null_class(tiny):
    tf, tok, tp, kp, init, plain, logits = tiny
    c = tf.config
    settings = MaskedSampling(num_iter=TINY_ITERS, cfg_scale=3.0, return_steps=True)
    guided = MaskedSampler(tf, tok, settings)(tp, kp, TINY_LABELS, jax.random.key(3))
    assert not np.array_equal(guided.final_seqs[:, -1], plain[:, -1])
    assert guided.images.shape == (3, 16, 16, 3)
    _check_trace(guided.final_seqs, guided.trace, init, settings, 0, c.codebook_size)
    for t in (0, 3):  # uncond + (cond - uncond) * scale, the unconditional rows carrying the null class token
        ids = guided.trace.step_ids[t]
        want = guide_from_uncond(logits(ids), logits(ids.at[:, 0].set(c.class_token(c.null_class))), settings.cfg_scale)
        err = np.abs(guided.trace.step_logits[t] - want) / np.maximum(1.0, np.abs(want))
        assert err.max() < FLOAT_TOL, err.max()  # measured 4.8e-7 relative (logits up to 28)


def test_top_k_and_temperature_filter_the_draw(tiny):
    tf, _, tp, _, init, plain, logits = tiny
    c, top_k, temp = tf.config, 3, 0.7
    settings = MaskedSampling(num_iter=TINY_ITERS, top_k=top_k, temperature=temp, return_steps=True)
    seqs, trace = _decode(tf, tp, init, jax.random.key(3), settings)
    assert not np.array_equal(seqs[:, -1], plain[:, -1])
    _check_trace(seqs, trace, init, settings, 0, c.codebook_size)
    for t in range(settings.num_iter):
        raw = logits(trace.step_ids[t]) / np.float32(temp)
        used = np.asarray(trace.step_logits[t])
        kept = np.isfinite(used)
        assert np.all(kept.sum(-1) == top_k)
        np.testing.assert_array_equal(kept, raw >= np.sort(raw, -1)[..., -top_k : -top_k + 1])
        np.testing.assert_allclose(used[kept], raw[kept], rtol=1e-5)  # measured 1.1e-7


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"schedule": "linear"}, "unknown mask schedule 'linear'"),
        ({"schedule": "powx"}, "unknown mask schedule 'powx'"),
        ({"num_iter": 0}, "num_iter must be >= 1"),
        ({"start_iter": 8}, r"start_iter must be in \[0, num_iter=8\)"),
        ({"start_iter": -1}, "start_iter must be in"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"choice_temperature": -0.5}, "choice_temperature must be >= 0"),
        ({"top_k": -1}, "top_k and cfg_scale must be >= 0"),
        ({"cfg_scale": -2.0}, "top_k and cfg_scale must be >= 0"),
    ],
)
def test_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        MaskedSampling(**kw)
    assert "\n" not in str(e.value)


def test_bad_models_and_inputs_fail_before_compiling():
    tf, tok, tp, kp = _tiny()
    c = tf.config
    for build, msg in [
        (lambda: MaskedSampler(tf, _tiny(codebook_size=32)[1]), "predicts 16 codes but the tokenizer has 32"),
        (lambda: MaskedSampler(tf, tok, MaskedSampling(num_iter=c.num_tokens + 1)), "more decode steps than tokens"),
        (lambda: MaskedSampler(tf, tok, MaskedSampling(cfg_scale=2.0)), "null class"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            build()
        assert "\n" not in str(e.value)
    sampler, key = MaskedSampler(tf, tok, MaskedSampling(num_iter=4)), jax.random.key(0)
    good = np.full((2, c.num_tokens), -1, np.int32)
    in_range = rf"class labels must be in \[0, {c.num_classes - 1}\]"  # the null class is no label to sample
    for labels, msg in (([0, c.num_classes], in_range), ([-1, 0], in_range), ([[1, 2]], "1-D sequence")):
        with pytest.raises(ValueError, match=msg):
            sampler(tp, kp, labels, key)
        with pytest.raises(ValueError, match=msg):
            sampler.edit(tp, kp, labels, good, key)
    for canvas, start, msg in [
        (good[:, 1:], None, r"canvas must be integer ids \[B=2, N=16\]"),
        (good[:1], None, r"canvas must be integer ids \[B=2, N=16\]"),
        (good.astype(np.float32), None, "canvas must be integer ids"),
        (np.full_like(good, c.codebook_size), None, r"canvas ids must be codes in \[0, 16\) or -1"),
        (good - 1, None, r"canvas ids must be codes in \[0, 16\) or -1"),
        (good, 4, r"start_iter must be in \[0, num_iter=4\)"),
        (good, -1, "start_iter must be in"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            sampler.edit(tp, kp, [0, 1], canvas, key, start_iter=start)
        assert "\n" not in str(e.value)
    assert sampler._fn._cache_size() == 0 and sampler._edit._cache_size() == 0
