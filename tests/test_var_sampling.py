"""VAR sampler: KV-cache decoding equals teacher forcing, one compile, guidance and filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.filters import filter_logits, top_k_filter, top_p_filter
from jaxgen.sampling.guidance import guide, linear_ramp
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from tests.helpers import tiny_var


@functools.partial(jax.jit, static_argnums=(0, 1))
def _teacher_forced_logits(vae, var, vae_params, var_params, labels, indices):
    """Logits of the [cond; null] batch on the sampled tokens, with the scale-causal mask and no cache."""
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, var.config.num_classes)])
    idx2 = [jnp.concatenate([i, i]) for i in indices]
    x = vae.apply({"params": vae_params}, idx2, method=MultiScaleVQVAE.teacher_forcing_input)
    return var.apply({"params": var_params}, labels2, x)


@pytest.mark.parametrize("kw", [dict(), dict(shared_aln=True), dict(attn_l2_norm=False, patch_nums=(1, 2, 4, 6))])
def test_kv_cache_logits_equal_teacher_forced_logits(kw):
    vae, var, vae_params, var_params = tiny_var(**kw)
    sampler = NextScaleSampler(
        var, vae, NextScaleSampling(cfg=2.0, top_k=8, top_p=0.9, temperature=1.3, return_logits=True)
    )
    labels = jnp.array([3, 0, 9, 10])  # 10 = the null class
    out = sampler(var_params, vae_params, labels, jax.random.key(1))
    cached = jnp.concatenate(out.head_logits, axis=1)
    full = _teacher_forced_logits(vae, var, vae_params, var_params, labels, out.indices)
    assert cached.shape == full.shape == (8, var.config.seq_len, var.config.vocab_size)
    # float32; the cached path sums attention over fewer (unmasked) keys in another order: ~1e-6 observed.
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=0)
    assert float(jnp.std(full)) > 0.1  # the check compares real, non-degenerate logits


def test_greedy_sampling_takes_the_argmax_of_the_guided_logits():
    vae, var, vae_params, var_params = tiny_var()
    cfg = 1.5
    sampler = NextScaleSampler(var, vae, NextScaleSampling(cfg=cfg, top_k=1, top_p=0.0))
    labels = jnp.array([1, 2, 5])
    out = sampler(var_params, vae_params, labels, jax.random.key(0))
    full = _teacher_forced_logits(vae, var, vae_params, var_params, labels, out.indices)
    for si, (b, e) in enumerate(var.config.scale_bounds):
        t = linear_ramp(cfg, si, len(var.config.patch_nums))
        guided = guide(full[:3, b:e], full[3:, b:e], t)
        np.testing.assert_array_equal(out.indices[si], jnp.argmax(guided, axis=-1))
    assert out.images.shape == (3, 8, 8, 3) and 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_one_compile_for_many_calls_and_keys_change_samples():
    vae, var, vae_params, var_params = tiny_var()
    sampler = NextScaleSampler(var, vae, NextScaleSampling(top_k=0, top_p=0.0))
    a = sampler(var_params, vae_params, [1, 2], jax.random.key(0))
    b = sampler(var_params, vae_params, [3, 4], jax.random.key(1))
    c = sampler(var_params, vae_params, [1, 2], jax.random.key(0))
    assert sampler._fn._cache_size() == 1
    assert any(not np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    for x, y in zip(a.indices, c.indices, strict=True):  # explicit key: reproducible
        np.testing.assert_array_equal(x, y)


def test_more_smooth_mixes_the_codes_that_survive_the_filters():
    """`more_smooth` (VAR's Gumbel-softmax visualisation) still draws the ids but feeds a soft mix of the surviving
    codes instead of the drawn code: reproducible for a key; scale 0 (same logits, same draw) gives the default
    path's ids while f_hat and the images move; with top_k=1 one code survives, the mix is that code's one-hot row,
    and the sample is exactly the default one."""
    vae, var, vae_params, var_params = tiny_var()
    labels, key = [0, 1, 7], jax.random.key(2)
    sampler = lambda **kw: NextScaleSampler(var, vae, NextScaleSampling(**kw))
    smooth_sampler = sampler(more_smooth=True, top_k=8)
    run = lambda s: s(var_params, vae_params, labels, key)
    smooth, again, hard = run(smooth_sampler), run(smooth_sampler), run(sampler(top_k=8))
    for x, y in zip(smooth.indices, again.indices, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(smooth.images, again.images)
    np.testing.assert_array_equal(smooth.indices[0], hard.indices[0])
    assert float(jnp.abs(smooth.f_hat - hard.f_hat).max()) > 1e-2 * float(jnp.abs(hard.f_hat).max())
    assert float(jnp.abs(smooth.images - hard.images).max()) > 1e-3
    one, one_hard = run(sampler(more_smooth=True, top_k=1)), run(sampler(top_k=1))
    for x, y in zip(one.indices, one_hard.indices, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(one.f_hat, one_hard.f_hat, rtol=0, atol=1e-6)


def test_labels_out_of_range_are_rejected_before_compiling():
    vae, var, vae_params, var_params = tiny_var()
    sampler = NextScaleSampler(var, vae)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        sampler(var_params, vae_params, [3, 11], jax.random.key(0))
    with pytest.raises(ValueError, match=r"class labels"):
        sampler(var_params, vae_params, [-1], jax.random.key(0))


def test_mismatched_tokenizer_is_rejected():
    vae, _, _, _ = tiny_var()
    _, var, _, _ = tiny_var(patch_nums=(1, 2, 4, 6))
    with pytest.raises(ValueError, match="patch_nums"):
        NextScaleSampler(var, vae)


def _reference_top_k_top_p(logits, k, p):
    """VAR's filter written out in numpy: top-k by threshold, top-p by sorted cumulative probability."""
    logits = logits.copy()
    if k > 0:
        kth = np.sort(logits, axis=-1)[..., -k][..., None]
        logits[logits < kth] = -np.inf
    if p > 0:
        order = np.argsort(logits, axis=-1, kind="stable")
        srt = np.take_along_axis(logits, order, -1)
        probs = np.exp(srt - srt.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        drop_sorted = np.cumsum(probs, -1) <= 1 - p
        drop_sorted[..., -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits[drop] = -np.inf
    return logits


@pytest.mark.parametrize("k,p", [(0, 0.9), (5, 0.0), (20, 0.5), (3, 0.99), (0, 0.0), (64, 0.3)])
def test_top_k_top_p_match_the_reference_semantics(k, p):
    """Distinct logits: `filter_logits(top_k, top_p)` as the samplers call it, and the two filters alone, against
    VAR's sort-based code."""
    logits = np.random.default_rng(k + int(p * 100)).normal(0, 2, (4, 7, 64)).astype(np.float32)
    ref = _reference_top_k_top_p(logits, k, p)
    together = np.asarray(filter_logits(jnp.asarray(logits), top_k=k, top_p=p))
    for ours in (together, np.asarray(top_p_filter(top_k_filter(jnp.asarray(logits), k), p))):
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        np.testing.assert_array_equal(ours[~np.isinf(ours)], logits[~np.isinf(ref)])
        assert np.isfinite(ours).any(axis=-1).all()  # at least one token always survives


def _brute_force_filter(logits, temperature, k, p):
    """`filter_logits` by definition, in float64: logits / temperature; top-k keeps every logit >= the k-th largest
    (ties kept); top-p then keeps a token when the probability (softmax over all top-k survivors) of the tokens
    strictly above it is < p, so tied tokens stay or go together. Returns (keep [R, V], ambiguous [R, V]): a token
    whose mass above lies within 1e-5 of p can go either way in float32 (e.g. p = 1 and a mass of 1 - 1e-9)."""
    x = logits.astype(np.float64) / temperature
    v = x.shape[-1]
    keep = np.ones(x.shape, bool)
    if 0 < k < v:
        keep &= x >= np.sort(x, axis=-1)[:, v - k, None]
    ambiguous = np.zeros(x.shape, bool)
    if p > 0:
        e = np.where(keep, np.exp(x - x.max(-1, keepdims=True)), 0.0)
        prob = e / e.sum(-1, keepdims=True)
        above = np.einsum("rj,rji->ri", prob, x[:, :, None] > x[:, None, :])  # mass of the tokens above token i
        ambiguous = keep & (np.abs(above - p) < 1e-5)
        keep &= above < p
    return keep, ambiguous


@pytest.mark.parametrize("seed", range(4))
def test_filter_logits_with_ties_matches_brute_force(seed):
    """Temperature, top-k and top-p in one call, as both samplers make it, on logits with many exact ties (a 0.5
    grid): at the k-th place, inside the nucleus and at its edge."""
    rng = np.random.default_rng(seed)
    v = 24
    logits = (np.round(rng.normal(0, 2, (64, v)) * 2) / 2).astype(np.float32)
    kth = np.sort(logits, -1)[:, v - 5]
    assert np.mean(np.sum(logits == kth[:, None], -1) > 1) > 0.3  # ties at the 5th place in many rows
    settings = [(1.0, 5, 0.9), (0.7, 3, 0.5), (1.3, 12, 0.99), (1.0, 1, 0.9), (1.0, 0, 0.8), (0.5, v, 0.3),
                (1.0, 8, 0.0), (2.0, 5, 1.0)]  # fmt: skip
    for temperature, k, p in settings:
        got = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=k, top_p=p))
        keep, ambiguous = _brute_force_filter(logits, temperature, k, p)
        where = f"temperature={temperature} top_k={k} top_p={p}"
        assert ambiguous.mean() < 0.01, where
        np.testing.assert_array_equal(np.isfinite(got)[~ambiguous], keep[~ambiguous], err_msg=where)
        np.testing.assert_allclose(got[keep], logits[keep] / np.float32(temperature), rtol=1e-6, err_msg=where)
        assert np.all(np.isneginf(got[~np.isfinite(got)])) and np.isfinite(got).any(-1).all(), where


def test_top_p_after_top_k_counts_every_top_k_survivor():
    """top_k=3 of [3, 2, 1, 1, 0] keeps four logits (a tie at the 3rd place). Over those four the probability above
    a 1 is 0.835 < 0.87, so top_p=0.87 keeps both 1s (VAR: top-k, then top-p over what is left); normalising over
    only three of them (0.910) would drop them."""
    got = filter_logits(jnp.array([3.0, 2.0, 1.0, 1.0, 0.0]), top_k=3, top_p=0.87)
    np.testing.assert_array_equal(np.isfinite(got), [True, True, True, True, False])


def test_linear_ramp_and_guide():
    assert linear_ramp(1.5, 0, 4) == 0.0 and linear_ramp(1.5, 3, 4) == 1.5 and linear_ramp(1.5, 1, 4) == 0.5
    np.testing.assert_allclose(guide(jnp.array([2.0]), jnp.array([1.0]), 0.5), [2.5])
