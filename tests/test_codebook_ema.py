"""EMA codebook updates, dead-code restarts and the sown code logits of the vector quantizers.

References are plain numpy (float64): nearest code by brute-force distances, the EMA formula of van den Oord et al.
(2017, appendix A.1) with Laplace smoothing, and (for the multi-scale quantizer) the residual loop itself. Tolerances:
the quantizer works in float32 on sums of at most a few dozen O(1) terms, so its relative error is a few float32 ulps
times that count (~1e-6); rtol 1e-5 / atol 1e-6 leaves a 10x margin while catching any formula error (an error in a
decay, a count or the smoothing moves values by >= 1e-3 here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.quantizers import LAPLACE_EPS, MultiScaleResidualQuantizer, VectorQuantizer
from jaxgen.models.tokenizers.resize import bicubic_resize
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig

TOL = dict(rtol=1e-5, atol=1e-6)


# ---- numpy references ------------------------------------------------------------------------------------------
def np_unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_nearest(z, e):
    """Brute-force nearest code (float64) and the margin to the runner-up, to make sure the test case has no ties."""
    d = ((z[:, None, :].astype(np.float64) - e[None].astype(np.float64)) ** 2).sum(-1)
    srt = np.sort(d, axis=1)
    return d.argmin(1), float((srt[:, 1] - srt[:, 0]).min())


def np_ema(cluster_size, embed_sum, z, idx, decay, eps=1e-5):
    """One EMA step: counts / sums of the assigned vectors, decayed statistics, Laplace-smoothed division."""
    v = cluster_size.shape[0]
    counts = np.zeros(v)
    np.add.at(counts, idx, 1.0)
    sums = np.zeros(embed_sum.shape)
    np.add.at(sums, idx, z.astype(np.float64))
    cs = decay * cluster_size + (1 - decay) * counts
    es = decay * embed_sum + (1 - decay) * sums
    n = cs.sum()
    return es / ((cs + eps) / (n + v * eps) * n)[:, None], cs, es


def np_block_mean(x, p):
    """Area resize by an integer factor = mean over blocks."""
    b, s, _, c = x.shape
    k = s // p
    return x.reshape(b, p, k, p, k, c).mean(axis=(2, 4))


def with_codebook(variables, **new):
    """A copy of `variables` with some "codebook" entries of the quantizer replaced."""
    cb = {k: jnp.asarray(v, jnp.float32) for k, v in variables["codebook"].items()}
    cb.update({k: jnp.asarray(v, jnp.float32) for k, v in new.items()})
    return {**variables, "codebook": cb}


def random_stats(rng, v, c):
    """A non-trivial EMA state: random positive cluster sizes, random sums, embedding = sum / size."""
    size = rng.uniform(0.5, 3.0, v)
    esum = rng.normal(size=(v, c)) * size[:, None]
    return esum / size[:, None], size, esum


# ---- EMA update vs numpy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("l2_norm", [False, True])
def test_vq_ema_step_matches_numpy(l2_norm):
    v, c, decay, beta = 16, 4, 0.9, 0.25
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 4, 4, c)).astype(np.float32)
    m = VectorQuantizer(v, c, l2_norm=l2_norm, beta=beta, ema_decay=decay)
    variables = m.init(jax.random.PRNGKey(0), z)
    assert "params" not in variables and set(variables["codebook"]) == {"embedding", "cluster_size", "embed_sum"}
    emb, size, esum = random_stats(rng, v, c)
    variables = with_codebook(variables, embedding=emb, cluster_size=size, embed_sum=esum)

    (q, loss, idx), state = m.apply(variables, z, mutable=["codebook"])

    zf = z.reshape(-1, c).astype(np.float64)
    zf = np_unit(zf) if l2_norm else zf
    e_used = np_unit(emb) if l2_norm else emb
    ref_idx, margin = np_nearest(zf, e_used)
    assert margin > 1e-4
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), ref_idx)
    ref_emb, ref_size, ref_sum = np_ema(size, esum, zf, ref_idx, decay)
    new = state["codebook"]
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), ref_size, **TOL)
    np.testing.assert_allclose(np.asarray(new["embed_sum"]), ref_sum, **TOL)
    np.testing.assert_allclose(np.asarray(new["embedding"]), ref_emb, **TOL)
    # outputs use the codebook before the update; the loss is the commitment term only
    np.testing.assert_allclose(np.asarray(q).reshape(-1, c), e_used[ref_idx], **TOL)
    np.testing.assert_allclose(float(loss), beta * np.mean((e_used[ref_idx] - zf) ** 2), **TOL)
    # the updated codebook is what codebook() reads next (renormalised with l2_norm)
    cb = m.apply({**variables, "codebook": new}, method=m.codebook)
    np.testing.assert_allclose(np.asarray(cb), np_unit(ref_emb) if l2_norm else ref_emb, **TOL)


def msvq_reference(f, emb, patch_nums):
    """VAR's residual loop without Phi (quant_resi = 0), in numpy: per-scale ids and the looked-up vectors."""
    big = patch_nums[-1]
    f_rest = f.astype(np.float64)
    ids, zs, min_margin = [], [], np.inf
    for si, p in enumerate(patch_nums):
        z = np_block_mean(f_rest, p) if si != len(patch_nums) - 1 else f_rest
        zf = z.reshape(-1, z.shape[-1])
        i, margin = np_nearest(zf, emb)
        min_margin = min(min_margin, margin)
        h = emb[i].reshape(z.shape)
        if si != len(patch_nums) - 1:  # bicubic upsampling (jaxgen's, checked against torch in test_resize.py)
            h = np.asarray(bicubic_resize(jnp.asarray(h, jnp.float32), (big, big)), np.float64)
        f_rest = f_rest - h
        ids.append(i)
        zs.append(zf)
    return ids, zs, min_margin


def test_msvq_ema_step_pools_all_scales():
    v, c, decay, patch_nums = 24, 4, 0.8, (1, 2, 4)
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 4, 4, c)).astype(np.float32)
    m = MultiScaleResidualQuantizer(v, c, patch_nums, quant_resi=0.0, ema_decay=decay)
    variables = m.init(jax.random.PRNGKey(0), f)
    assert "params" not in variables  # quant_resi 0: no Phi convs; the codebook is not a param
    emb, size, esum = random_stats(rng, v, c)
    emb = emb * 0.5
    variables = with_codebook(variables, embedding=emb, cluster_size=size, embed_sum=esum)

    (_, _, indices), state = m.apply(variables, f, mutable=["codebook"])

    ref_ids, ref_zs, margin = msvq_reference(f, emb, patch_nums)
    assert margin > 1e-4
    for got, want in zip(indices, ref_ids, strict=True):
        np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)
    ref_emb, ref_size, ref_sum = np_ema(size, esum, np.concatenate(ref_zs), np.concatenate(ref_ids), decay)
    assert ref_size.sum() == pytest.approx(decay * size.sum() + (1 - decay) * 3 * (1 + 4 + 16))
    new = state["codebook"]
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), ref_size, **TOL)
    np.testing.assert_allclose(np.asarray(new["embed_sum"]), ref_sum, **TOL)
    np.testing.assert_allclose(np.asarray(new["embedding"]), ref_emb, **TOL)


def test_msvq_ema_keeps_phi_gradients_and_vae_codebook():
    v, c = 16, 4
    f = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, c)), jnp.float32)
    m = MultiScaleResidualQuantizer(v, c, (1, 2, 4), quant_resi=0.5, share_quant_resi=2, ema_decay=0.9)
    variables = m.init(jax.random.PRNGKey(0), f)
    assert set(variables["params"]) == {"phi_0", "phi_1"}  # no codebook param, the Phi convs are still params

    @jax.jit
    def grads(params, codebook):
        def loss_fn(p):
            (_, vq, _), state = m.apply({"params": p, "codebook": codebook}, f, mutable=["codebook"])
            return vq, state

        return jax.grad(loss_fn, has_aux=True)(params)

    g, state = grads(variables["params"], variables["codebook"])
    assert all(float(jnp.sum(x**2)) > 0 for x in jax.tree_util.tree_leaves(g))
    assert not np.allclose(state["codebook"]["embedding"], variables["codebook"]["embedding"])
    # MultiScaleVQVAE.codebook() reads the EMA variable (setup is lazy: only the quantizer's variables are needed)
    cfg = MSVQConfig(vocab_size=v, z_channels=c, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    vae = MultiScaleVQVAE(MSVQConfig(**{**cfg.__dict__, "ema_decay": 0.9}))
    cb = vae.apply({"codebook": {"quantize": state["codebook"]}}, method=vae.codebook)
    np.testing.assert_array_equal(np.asarray(cb), np.asarray(state["codebook"]["embedding"]))


# ---- mutability and the default param tree ---------------------------------------------------------------------
def test_not_mutable_reads_codebook_unchanged_and_init_does_not_update():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
    m = VectorQuantizer(16, 4, l2_norm=False, ema_decay=0.9)
    variables = m.init(jax.random.PRNGKey(0), z)
    cb = variables["codebook"]
    np.testing.assert_array_equal(cb["embed_sum"], cb["embedding"])  # init: embed_sum = embedding, sizes 1
    np.testing.assert_array_equal(cb["cluster_size"], np.ones(16))
    assert float(jnp.max(jnp.abs(cb["embedding"]))) <= 1 / 16
    q, _, idx = m.apply(variables, z)  # straight-through z + (e - z): e up to float32 rounding of O(1) values
    np.testing.assert_allclose(
        np.asarray(q).reshape(-1, 4), np.asarray(cb["embedding"])[np.asarray(idx).ravel()], **TOL
    )
    _, state = jax.jit(lambda v, x: m.apply(v, x, mutable=["intermediates"]))(variables, z)
    assert "codebook" not in state  # not mutable: nothing written back
    (q2, _, _), moved = m.apply(variables, z, mutable=["codebook"])
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))  # the forward reads the old codebook either way
    assert not np.allclose(moved["codebook"]["embedding"], cb["embedding"])


def test_default_param_trees_unchanged():
    vq = VQGAN(VQConfig(codebook_size=32, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1))
    img = jnp.zeros((1, 8, 8, 3))
    shapes = jax.eval_shape(vq.init, jax.random.PRNGKey(0), img)
    assert set(shapes) == {"params"}
    assert shapes["params"]["quantize"]["embedding"]["embedding"].shape == (32, 4)
    assert set(shapes["params"]["quantize"]) == {"embedding"}
    cfg = MSVQConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    shapes = jax.eval_shape(MultiScaleVQVAE(cfg).init, jax.random.PRNGKey(0), img)
    assert set(shapes) == {"params"}
    assert shapes["params"]["quantize"]["embedding"]["embedding"].shape == (32, 8)
    ema = jax.eval_shape(VQGAN(VQConfig(**{**vq.config.__dict__, "ema_decay": 0.99})).init, jax.random.PRNGKey(0), img)
    assert "quantize" not in ema["params"]
    assert {k: v.shape for k, v in ema["codebook"]["quantize"].items()} == {
        "embedding": (32, 4),
        "cluster_size": (32,),
        "embed_sum": (32, 4),
    }


# ---- dead-code restarts ----------------------------------------------------------------------------------------
def test_dead_code_restart():
    v, c, decay, thr = 4, 2, 0.5, 0.5
    rng = np.random.default_rng(4)
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    z = (np.repeat(centres, 8, axis=0) + 0.05 * rng.normal(size=(24, c))).astype(np.float32).reshape(2, 3, 4, c)
    emb = np.concatenate([centres, [[100.0, 100.0]]])  # code 3 is far from every input
    m = VectorQuantizer(v, c, l2_norm=False, ema_decay=decay, dead_code_threshold=thr)
    variables = with_codebook(m.init(jax.random.PRNGKey(0), z), embedding=emb, cluster_size=np.ones(v), embed_sum=emb)
    step = jax.jit(lambda vs, x, key: m.apply(vs, x, mutable=["codebook", "intermediates"], rngs={"codebook": key})[1])
    size, esum = np.ones(v), emb.copy()
    restarted = []
    for t in range(2):
        state = step(variables, z, jax.random.PRNGKey(t))
        restarted.append(int(state["intermediates"]["restarted_codes"][0]))
        ref_emb, size, esum = np_ema(size, esum, z.reshape(-1, c), np.repeat([0, 1, 2], 8), decay)
        variables = {"codebook": state["codebook"]}
        if t == 0:  # 0.5 * 1 is not below 0.5: code 3 survives the first step, unchanged
            np.testing.assert_allclose(np.asarray(variables["codebook"]["embedding"]), ref_emb, **TOL)
    assert restarted == [0, 1]
    new = variables["codebook"]
    code3 = np.asarray(new["embedding"])[3]
    assert np.any(np.all(code3 == z.reshape(-1, c), axis=1)), code3  # exactly one of the batch vectors
    assert float(new["cluster_size"][3]) == thr
    np.testing.assert_allclose(np.asarray(new["embed_sum"])[3], thr * code3, **TOL)
    # the live codes follow the plain EMA formula
    np.testing.assert_allclose(np.asarray(new["cluster_size"])[:3], size[:3], **TOL)
    np.testing.assert_allclose(np.asarray(new["embed_sum"])[:3], esum[:3], **TOL)
    # the restarted code is used from the next step on
    (_, _, idx), _ = m.apply(
        {"codebook": new},
        jnp.asarray(code3).reshape(1, 1, 1, c),
        mutable=["codebook"],
        rngs={"codebook": jax.random.PRNGKey(9)},
    )
    assert int(idx[0, 0]) == 3


def test_dead_code_restart_msvq_uses_the_pooled_vectors():
    v, c, patch_nums = 8, 2, (1, 2)
    rng = np.random.default_rng(5)
    f = rng.normal(size=(2, 2, 2, c)).astype(np.float32)
    emb = np.concatenate([rng.normal(size=(v - 1, c)), [[50.0, -50.0]]])
    m = MultiScaleResidualQuantizer(v, c, patch_nums, quant_resi=0.0, ema_decay=0.5, dead_code_threshold=0.3)
    variables = with_codebook(
        m.init(jax.random.PRNGKey(0), f), embedding=emb, cluster_size=np.full(v, 0.5), embed_sum=emb
    )
    _, state = m.apply(variables, f, mutable=["codebook", "intermediates"], rngs={"codebook": jax.random.PRNGKey(1)})
    ref_ids, ref_zs, _ = msvq_reference(f, emb, patch_nums)
    used = set(np.concatenate(ref_ids).tolist())
    n_restart = int(state["intermediates"]["restarted_codes"][0])
    assert n_restart == v - len(used) and 7 not in used  # 0.5 * 0.5 < 0.3 for every unused code
    pool = np.concatenate(ref_zs)
    for k in sorted(set(range(v)) - used):
        code = np.asarray(state["codebook"]["embedding"])[k]
        assert np.min(np.abs(pool - code).max(axis=1)) < 1e-6, (k, code)


def test_dead_code_threshold_needs_ema_and_an_rng():
    z = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"dead_code_threshold.*ema_decay"):
        VectorQuantizer(8, 4, dead_code_threshold=1.0).init(jax.random.PRNGKey(0), z)
    with pytest.raises(ValueError, match=r"dead_code_threshold.*ema_decay"):
        MultiScaleResidualQuantizer(8, 4, (1, 2), dead_code_threshold=1.0).init(jax.random.PRNGKey(0), z)
    with pytest.raises(ValueError, match=r"dead_code_threshold.*ema_decay"):
        VQConfig(dead_code_threshold=1.0)
    with pytest.raises(ValueError, match=r"dead_code_threshold.*ema_decay"):
        MSVQConfig(dead_code_threshold=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        VQConfig(ema_decay=1.0)
    m = VectorQuantizer(8, 4, ema_decay=0.9, dead_code_threshold=1.0)
    variables = m.init(jax.random.PRNGKey(0), z)  # init never updates, so needs no "codebook" rng
    with pytest.raises(ValueError, match="rngs"):
        m.apply(variables, z, mutable=["codebook"])


# ---- sown logits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [0.0, 0.9])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_vq_code_logits(l2_norm, ema):
    v, c = 16, 4
    z = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, c)), jnp.float32)
    m = VectorQuantizer(v, c, l2_norm=l2_norm, ema_decay=ema)
    variables = m.init(jax.random.PRNGKey(0), z)

    def entropy(x):
        (_, _, idx), st = m.apply(variables, x, mutable=["intermediates"])
        (logits,) = st["intermediates"]["code_logits"]
        p = jax.nn.softmax(logits)
        return -jnp.sum(p * jnp.log(p + 1e-9)), (logits, idx)

    grad, (logits, idx) = jax.jit(jax.grad(entropy, has_aux=True))(z)
    assert logits.shape == (18, v) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), axis=1), np.asarray(idx).reshape(-1))
    assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0


@pytest.mark.parametrize("znorm", [False, True])
def test_msvq_code_logits_reach_the_input(znorm):
    v, c, patch_nums = 16, 4, (1, 2, 4)
    f = jnp.asarray(np.random.default_rng(7).normal(size=(2, 4, 4, c)), jnp.float32)
    m = MultiScaleResidualQuantizer(v, c, patch_nums, using_znorm=znorm)
    variables = m.init(jax.random.PRNGKey(0), f)

    def score(x):
        (_, _, indices), st = m.apply(variables, x, mutable=["intermediates"])
        logits = st["intermediates"]["code_logits"]
        return sum(jnp.sum(jax.nn.log_softmax(lg)[:, 0]) for lg in logits), (logits, indices)

    grad, (logits, indices) = jax.jit(jax.grad(score, has_aux=True))(f)
    assert len(logits) == len(patch_nums)
    for lg, idx, p in zip(logits, indices, patch_nums, strict=True):
        assert lg.shape == (2 * p * p, v) and lg.dtype == jnp.float32
        np.testing.assert_array_equal(np.argmax(np.asarray(lg), axis=1), np.asarray(idx).reshape(-1))
    assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) > 0


# ---- end to end: a tiny VQGAN trained with an EMA codebook -------------------------------------------------------
def test_tiny_vqgan_trains_with_ema_codebook():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:32].astype(np.float32) / 16.0 * 2.0 - 1.0  # [32, 8, 8] in [-1, 1]
    img = jnp.asarray(np.repeat(digits[..., None], 3, axis=-1))
    cfg = VQConfig(
        codebook_size=32,
        codebook_embed_dim=4,
        z_channels=32,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        l2_norm=False,
        ema_decay=0.9,
        dead_code_threshold=0.05,
    )
    model = VQGAN(cfg)
    variables = model.init(jax.random.PRNGKey(0), img[:1])
    params, codebook = variables["params"], variables["codebook"]
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, codebook, opt_state, key):
        """How a trainer calls it: the "codebook" collection mutable and carried, a "codebook" PRNG stream."""

        def loss_fn(p):
            (rec, vq, _), state = model.apply(
                {"params": p, "codebook": codebook}, img, mutable=["codebook"], rngs={"codebook": key}
            )
            mse = jnp.mean((rec - img) ** 2)  # rec uses the codebook as it was before this step's update
            return mse + vq, (mse, state["codebook"])

        (_, (mse, codebook)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), codebook, opt_state, mse

    key = jax.random.PRNGKey(1)
    mses = []
    for _ in range(31):  # 30 updates; the 31st call measures the reconstruction of the trained state
        key, sub = jax.random.split(key)
        params, codebook, opt_state, mse = train_step(params, codebook, opt_state, sub)
        mses.append(float(mse))
    before, after = mses[0], mses[-1]
    assert np.isfinite(after) and after < 0.7 * before, mses
    assert not np.allclose(codebook["quantize"]["embedding"], variables["codebook"]["quantize"]["embedding"])
    assert LAPLACE_EPS == 1e-5
