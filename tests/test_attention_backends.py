"""Attention backends (`jaxgen.models.attention.attention`): the block-sparse Pallas kernel (interpret mode on CPU)
gives the dense XLA path's logits, loss, gradients and samples in the tiny VAR and LlamaGen; the cuDNN routing (with
a stand-in for `jax.nn.dot_product_attention`, as there is no GPU here) and the errors."""

import functools
import inspect
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen.models.attention as attn_mod
from jaxgen.config_util import load_config
from jaxgen.families import FAMILIES, param_shapes
from jaxgen.families.llamagen import build as build_llamagen
from jaxgen.families.var import build as build_var
from jaxgen.models.attention import attention, attention_mask, dot_product_attention
from jaxgen.models.generators.next_scale import NextScaleConfig
from jaxgen.models.generators.next_token import NextTokenConfig
from jaxgen.models.layers import token_cross_entropy
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling
from tests.helpers import random_params

REPO = Path(__file__).resolve().parents[1]

# float32 on both sides (conftest: "highest" matmul precision; the kernel uses IEEE-precision dots for float32), but
# the kernel sums in another order (tiles, online softmax in base 2 with a running max). Measured here: logits
# <= 1.7e-6 (max |logit| 3-6), loss <= 4.8e-7, gradients <= 9.5e-7 of each leaf's largest entry, single-op outputs
# <= 3.6e-7. TOL = 1e-4 (relative to max(1, the largest reference value)) leaves a ~60x margin for other CPUs / XLA
# versions and still catches any masking, layout or scale error, which moves values by O(0.1-1).
TOL = 1e-4


def scale_causal_mask(patch_nums) -> np.ndarray:
    """VAR's `[L, L]` mask by the name its config gives it."""
    return attention_mask("scale_causal", sum(p * p for p in patch_nums), patch_nums)


def _rel_close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


@functools.lru_cache(maxsize=2)
def _var(backend: str):
    cfg = load_config(str(REPO / "configs/var_tiny.py"))
    cfg.vae.ch_mult, cfg.vae.num_res_blocks = (1, 2), 1  # a 2x tokenizer: the images are not the point here
    vae, var = build_var(cfg.vae, {**cfg.var.to_dict(), "attn_backend": backend})
    shapes = param_shapes(FAMILIES["var"], vae, var)
    return vae, var, random_params(shapes["vae"], 0), random_params(shapes["var"], 1)


@functools.lru_cache(maxsize=4)
def _llamagen(backend: str, n_kv_head: int | None = None):
    cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
    cfg.vq.ch_mult, cfg.vq.num_res_blocks = (1, 2), 1
    vq, gpt = build_llamagen(cfg.vq, {**cfg.gpt.to_dict(), "attn_backend": backend, "n_kv_head": n_kv_head})
    shapes = param_shapes(FAMILIES["llamagen"], vq, gpt)
    return vq, gpt, random_params(shapes["vq"], 0), random_params(shapes["gpt"], 1)


@functools.partial(jax.jit, static_argnums=0)
def _var_loss_and_grad(var, params, labels, x, targets, key):
    def loss_fn(p):
        logits = var.apply({"params": p}, labels, x, train=True, rngs={"dropout": key})
        return token_cross_entropy(logits, targets), logits

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


@functools.partial(jax.jit, static_argnums=0)
def _gpt_loss_and_grad(gpt, params, labels, tokens, key):
    def loss_fn(p):
        logits = gpt.apply({"params": p}, labels, tokens[:, :-1], train=True, rngs={"dropout": key})
        return token_cross_entropy(logits, tokens), logits

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _check_training(run, xla_model, pallas_model, params, *args):
    (loss_x, logits_x), grads_x = run(xla_model, params, *args)
    (loss_p, logits_p), grads_p = run(pallas_model, params, *args)
    assert float(jnp.std(logits_x)) > 0.1  # real, non-degenerate logits
    _rel_close(logits_p, logits_x)
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=TOL)
    flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
    flat_p = jax.tree.leaves(grads_p)
    assert len(flat_x) == len(flat_p)
    for (path, gx), gp in zip(flat_x, flat_p, strict=True):
        scale = float(jnp.abs(gx).max())
        assert np.all(np.isfinite(gp)), jax.tree_util.keystr(path)
        np.testing.assert_allclose(gp, gx, rtol=0, atol=TOL * scale + 1e-12, err_msg=jax.tree_util.keystr(path))
    # the q / k / v projections get real gradients through the kernel's backward (not zero on both sides)
    qkv = [float(jnp.abs(g).max()) for p, g in flat_x if "qkv" in jax.tree_util.keystr(p)]
    assert qkv and min(qkv) > 1e-4


# ---- the models ---------------------------------------------------------------------------------------------------
def test_var_training_forward_and_gradients_pallas_equal_xla():
    _, var_x, _, params = _var("xla")
    _, var_p, _, _ = _var("pallas")
    c = var_x.config
    rng = np.random.default_rng(0)
    labels = jnp.asarray([1, 4, c.num_classes], jnp.int32)
    x = jnp.asarray(rng.standard_normal((3, c.seq_len - c.first_l, c.z_channels)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, c.vocab_size, (3, c.seq_len)), jnp.int32)
    _check_training(_var_loss_and_grad, var_x, var_p, params, labels, x, targets, jax.random.key(2))


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_llamagen_training_forward_and_gradients_pallas_equal_xla(n_kv_head):
    _, gpt_x, _, params = _llamagen("xla", n_kv_head)
    _, gpt_p, _, _ = _llamagen("pallas", n_kv_head)
    c = gpt_x.config
    labels = jnp.asarray([0, 7, c.null_class], jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab_size, (3, c.block_size)), jnp.int32)
    _check_training(_gpt_loss_and_grad, gpt_x, gpt_p, params, labels, tokens, jax.random.key(3))


def test_var_sampling_pallas_gives_xla_tokens():
    """KV-cached sampling: each scale attends to the (static-length) cache with the kernel. Same key -> same draws;
    the logits differ by <= 1.5e-6 (measured), far from any top-k / top-p / categorical boundary for this key, so
    the tokens are compared exactly (deterministic on a given machine), the logits within TOL."""
    vae, var_x, vae_params, params = _var("xla")
    _, var_p, _, _ = _var("pallas")
    settings = NextScaleSampling(cfg=2.0, top_k=8, top_p=0.9, temperature=1.3, return_logits=True)
    labels, key = jnp.array([3, 0, 9]), jax.random.key(1)
    out_x = NextScaleSampler(var_x, vae, settings)(params, vae_params, labels, key)
    out_p = NextScaleSampler(var_p, vae, settings)(params, vae_params, labels, key)
    for lx, lp in zip(out_x.head_logits, out_p.head_logits, strict=True):
        _rel_close(lp, lx)
    for ix, ip in zip(out_x.indices, out_p.indices, strict=True):
        np.testing.assert_array_equal(ip, ix)


def test_llamagen_sampling_pallas_gives_xla_tokens():
    """The prefill runs the kernel (static one-slot mask); the scanned decode steps are dense by design (traced
    valid length). Tokens exactly equal, logits within TOL (measured: equal, as a prefill query attends to one key,
    whose weight is exactly 1 on both paths)."""
    vq, gpt_x, vq_params, params = _llamagen("xla")
    _, gpt_p, _, _ = _llamagen("pallas")
    settings = NextTokenSampling(cfg_scale=2.0, top_k=8, temperature=1.3, return_logits=True)
    labels, key = jnp.array([2, 7, 10]), jax.random.key(3)
    out_x = NextTokenSampler(gpt_x, vq, settings)(params, vq_params, labels, key)
    out_p = NextTokenSampler(gpt_p, vq, settings)(params, vq_params, labels, key)
    _rel_close(out_p.step_logits, out_x.step_logits)
    np.testing.assert_array_equal(out_p.tokens, out_x.tokens)


def test_config_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match=r"NextScaleConfig.attn_backend.*'flash'.*'xla', 'cudnn', 'pallas'"):
        NextScaleConfig(attn_backend="flash")
    with pytest.raises(ValueError, match=r"NextTokenConfig.attn_backend.*'flash'.*'xla', 'cudnn', 'pallas'"):
        NextTokenConfig(attn_backend="flash")


# ---- attention() --------------------------------------------------------------------------------------------------
def _qkv(b=2, h=4, hkv=2, lq=30, lk=30, d=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, h, lq, d), dtype)
    k = jax.random.normal(ks[1], (b, hkv, lk, d), dtype)
    v = jax.random.normal(ks[2], (b, hkv, lk, d), dtype)
    return q, k, v


def test_xla_backend_is_the_dense_path_and_repeats_grouped_heads():
    q, k, v = _qkv(hkv=4)
    mask = scale_causal_mask((1, 2, 3, 4))
    np.testing.assert_array_equal(
        attention(q, k, v, mask=mask, scale=0.3), dot_product_attention(q, k, v, mask_ll=mask, scale=0.3)
    )
    q, k, v = _qkv(hkv=2)
    want = dot_product_attention(q, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1), mask_ll=mask, scale=0.3)
    np.testing.assert_array_equal(attention(q, k, v, mask=mask, scale=0.3, backend="xla"), want)


@pytest.mark.parametrize(
    "mask",
    [scale_causal_mask((1, 2, 3, 4)), np.tri(30, dtype=bool), None, np.arange(30)[None, :] < 7],
    ids=["scale-causal", "causal", "none", "prefix-broadcast"],
)
def test_pallas_backend_equals_xla_with_grouped_heads(mask):
    q, k, v = _qkv(hkv=2)
    want = attention(q, k, v, mask=mask, scale=0.3, backend="xla")
    got = attention(q, k, v, mask=mask, scale=0.3, backend="pallas")  # interpret=None: interpret mode on CPU
    assert got.shape == want.shape and got.dtype == want.dtype
    _rel_close(got, want)


def test_pallas_backend_cross_attention_lengths():
    q, k, v = _qkv(lq=9, lk=14)  # a VAR decode step: this scale's 9 queries over the 14 cached + own keys
    _rel_close(attention(q, k, v, scale=0.25, backend="pallas"), attention(q, k, v, scale=0.25))


def _shard_map_eqns(jaxpr):
    """Every `shard_map` equation in a closed jaxpr, nested ones included."""
    found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map"]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += _shard_map_eqns(sub)
    return found


@pytest.mark.parametrize("hkv", [2, 1], ids=["kv-heads-split", "kv-heads-repeated"])
def test_pallas_backend_under_a_mesh_runs_per_device_slices(hkv):
    """Under a 2x2x2 mesh the kernel runs inside shard_map on each device's batch / heads slice (XLA cannot split a
    custom call: it would gather everything onto every device) and gives the unsharded values and gradients. With one
    kv head, which 'tensor' = 2 cannot split, the kv heads are repeated to q's first."""
    from jaxgen.parallel.mesh import create_mesh
    from jaxgen.parallel.partition import activation_rules

    b, h, length, d = 4, 4, 30, 16
    q, k, v = _qkv(b=b, h=h, hkv=hkv, lq=length, lk=length, d=d)
    mask = scale_causal_mask((1, 2, 3, 4))

    def loss(q, k, v, backend):
        return jnp.sum(attention(q, k, v, mask=mask, scale=d**-0.5, backend=backend) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    want = grad_fn(q, k, v, "xla")
    with activation_rules(create_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        jaxpr = jax.make_jaxpr(grad_fn, static_argnums=3)(q, k, v, "pallas")
        got = grad_fn(q, k, v, "pallas")
    maps = _shard_map_eqns(jaxpr.jaxpr)
    assert maps, "the pallas call is not under shard_map"
    inner = maps[0].params["jaxpr"]
    # batch 4 over data x fsdp = 4, heads 4 over tensor = 2: each device holds [1, 2, L, D] of q
    # the block tables enter replicated; q, k, v come last. batch 4 over data x fsdp = 4 and heads 4 over tensor = 2:
    # each device runs the kernel on [1, 2, L, D] of q
    *_, q_in, k_in, _ = inner.invars
    assert tuple(q_in.aval.shape) == (b // 4, h // 2, length, d)
    assert tuple(k_in.aval.shape) == (b // 4, hkv // 2 if hkv % 2 == 0 else h // 2, length, d)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _rel_close(g, w)


def test_pallas_backend_rejects_a_traced_mask():
    q, k, v = _qkv()
    f = jax.jit(lambda m: attention(q, k, v, mask=m, scale=1.0, backend="pallas"))
    with pytest.raises(ValueError, match=r"'pallas' needs a static mask.*traced.*'xla'"):
        f(np.tri(30, dtype=bool))


def test_unknown_backend_lists_the_three():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'flash'.*'xla', 'cudnn', 'pallas'"):
        attention(q, k, v, scale=1.0, backend="flash")


def test_cudnn_backend_on_cpu_is_a_clear_error():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'cudnn' runs only on an NVIDIA GPU.*'cpu'.*'xla' or 'pallas'"):
        attention(q, k, v, scale=1.0, backend="cudnn")


def _fake_cudnn(calls, real, with_mask=True):
    """Stands in for jax.nn.dot_product_attention: records the call, computes it with JAX's XLA implementation."""

    def fake(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, implementation=None):
        calls.append(dict(mask=mask, is_causal=is_causal, implementation=implementation))
        return real(query, key, value, bias, mask, scale=scale, is_causal=is_causal, implementation="xla")

    if with_mask:
        return fake

    def fake_without_mask(query, key, value, bias=None, *, scale=None, is_causal=False, implementation=None):
        return fake(query, key, value, bias, None, scale=scale, is_causal=is_causal, implementation=implementation)

    return fake_without_mask


def test_cudnn_routing_of_masks_with_a_stand_in_gpu(monkeypatch):
    """No GPU here: `_platform` says 'gpu' and jax.nn.dot_product_attention is a recording stand-in running JAX's
    XLA implementation, which checks the layout transposes, the causal / mask / no-mask routing and GQA."""
    real = jax.nn.dot_product_attention
    calls = []
    monkeypatch.setattr(attn_mod, "_platform", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _fake_cudnn(calls, real))
    q, k, v = _qkv(hkv=2, dtype=jnp.bfloat16)
    cases = [
        (None, False, False),
        (np.tri(30, dtype=bool), True, False),
        (scale_causal_mask((1, 2, 3, 4)), False, True),
    ]
    for mask, causal, passes_mask in cases:
        got = attention(q, k, v, mask=mask, scale=0.3, backend="cudnn")
        want = attention(q, k, v, mask=mask, scale=0.3, backend="xla")
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        _rel_close(got, want, tol=2e-2)  # bfloat16 (8 mantissa bits) on both sides, different op order
        call = calls.pop()
        assert call["implementation"] == "cudnn" and call["is_causal"] == causal
        assert (call["mask"] is not None) == passes_mask
    with pytest.raises(ValueError, match=r"'cudnn' needs bfloat16 or float16.*float32"):
        attention(*_qkv(), scale=1.0, backend="cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _fake_cudnn(calls, real, with_mask=False))
    assert "mask" not in inspect.signature(jax.nn.dot_product_attention).parameters
    attention(q, k, v, mask=np.tri(30, dtype=bool), scale=0.3, backend="cudnn")  # causal needs no mask argument
    with pytest.raises(ValueError, match=r"neither; use backend 'xla' or 'pallas'"):
        attention(q, k, v, mask=scale_causal_mask((1, 2, 3, 4)), scale=0.3, backend="cudnn")


def _forward(model):
    return lambda params, *args: model.apply({"params": params}, *args)


def test_models_that_name_no_backend_run_the_plain_xla_path():
    """A config that leaves `attn_backend` out gets dense XLA attention: the forward lowers to no custom kernel (it
    runs on any platform, and XLA can partition it), with logits bit-identical to `attn_backend='xla'`; the same
    jaxpr check does find the kernel in a Pallas model, so it can fail."""
    var_cfg = load_config(str(REPO / "configs/var_tiny.py"))
    var_cfg.vae.ch_mult, var_cfg.vae.num_res_blocks = (1, 2), 1
    gpt_cfg = load_config(str(REPO / "configs/llamagen_tiny.py"))
    gpt_cfg.vq.ch_mult, gpt_cfg.vq.num_res_blocks = (1, 2), 1
    without = lambda section: {k: v for k, v in section.to_dict().items() if k != "attn_backend"}
    _, var_default = build_var(var_cfg.vae, without(var_cfg.var))
    _, gpt_default = build_llamagen(gpt_cfg.vq, without(gpt_cfg.gpt))
    _, var_x, _, var_params = _var("xla")
    _, gpt_x, _, gpt_params = _llamagen("xla")
    rng = np.random.default_rng(0)
    c = var_x.config
    var_args = (jnp.asarray([1, 4], jnp.int32), jnp.asarray(rng.standard_normal((2, c.seq_len - 1, c.z_channels))))
    gpt_args = (jnp.asarray([2, 7], jnp.int32), jnp.asarray(rng.integers(0, 64, (2, 15)), jnp.int32))
    for default, xla, pallas, params, args in (
        (var_default, var_x, _var("pallas")[1], var_params, var_args),
        (gpt_default, gpt_x, _llamagen("pallas")[1], gpt_params, gpt_args),
    ):
        program = str(jax.make_jaxpr(_forward(default))(params, *args))
        assert "pallas_call" not in program and "custom_call" not in program
        assert "pallas_call" in str(jax.make_jaxpr(_forward(pallas))(params, *args))
        np.testing.assert_array_equal(jax.jit(_forward(default))(params, *args), jax.jit(_forward(xla))(params, *args))


def test_dropout_on_the_probabilities_is_xla_only_and_keyed():
    """Inverted dropout on the attention probabilities (MaskGIT's training): rate 0 is the plain op; the same key
    drops the same entries; the expectation over keys is the plain output; other backends refuse it."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 8, 4)), jnp.float32) for _ in range(3))
    plain = attention(q, k, v, scale=0.5)
    assert np.array_equal(attention(q, k, v, scale=0.5, dropout_rate=0.0), plain)
    key = jax.random.key(1)
    a = attention(q, k, v, scale=0.5, dropout_rate=0.3, dropout_rng=key)
    assert np.array_equal(a, attention(q, k, v, scale=0.5, dropout_rate=0.3, dropout_rng=key))
    assert not np.allclose(a, plain)
    keys = jax.random.split(jax.random.key(2), 2000)
    mean = jax.vmap(lambda kk: attention(q, k, v, scale=0.5, dropout_rate=0.3, dropout_rng=kk))(keys).mean(0)
    np.testing.assert_allclose(mean, plain, atol=0.06)  # 2000 draws: sd of the mean ~0.01 here
    with pytest.raises(ValueError, match="backend 'xla'"):
        attention(q, k, v, scale=0.5, backend="pallas", dropout_rate=0.3, dropout_rng=key)
    with pytest.raises(ValueError, match="dropout_rng"):
        attention(q, k, v, scale=0.5, dropout_rate=0.3)
