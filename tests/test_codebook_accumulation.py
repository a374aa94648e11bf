"""The EMA codebook under gradient accumulation: one train step of A micro-batches makes the one codebook update the
whole batch makes (quantizers.py, "One update per train step"), not A updates (the decay applied A times, lookups of
later micro-batches against a codebook that already moved, restarts per micro-batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.quantizers import VectorQuantizer, micro_batch
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.train.sections import train_section
from jaxgen.train.state import create_state
from jaxgen.train.step import make_train_step
from jaxgen.train.tokenizer_task import TokenizerLossConfig, tokenizer_task

# float32: the micro-batches' counts and sums are added in another order than the whole batch's segment sums
TOL = dict(rtol=2e-5, atol=2e-6)


def _images(n: int, size: int = 8) -> jax.Array:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n].astype(np.float32) / 16.0 * 2.0 - 1.0
    img = np.repeat(digits[..., None], 3, axis=-1)  # [n, 8, 8, 3]
    return jnp.asarray(np.kron(img, np.ones((1, size // 8, size // 8, 1), np.float32)))


def _tokenizer(kind: str, **codebook):
    if kind == "vqgan":
        cfg = VQConfig(codebook_size=16, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       l2_norm=False, ema_decay=0.8, **codebook)  # fmt: skip
        return VQGAN(cfg)
    cfg = MSVQConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4),
                     ema_decay=0.8, **codebook)  # fmt: skip
    return MultiScaleVQVAE(cfg)


def _one_step(tokenizer, images, accum_steps: int):
    task = tokenizer_task(tokenizer, TokenizerLossConfig(), image_size=images.shape[1])
    tc = ml_collections.ConfigDict(
        train_section(steps=10, warmup_steps=0, lr=1e-3, accum_steps=accum_steps, batch_size=images.shape[0])
    )
    tx = task.optimizer(tc)
    key = jax.random.key(0)
    params, model_state = task.init(key)
    state = create_state(params, tx, jax.random.key_data(jax.random.key(1)), model_state)
    step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.9, accum_steps=accum_steps))
    new, metrics = step(state, {"image": images}, None)
    return state, new, metrics


@pytest.mark.parametrize("kind", ["vqgan", "msvq"])
def test_accumulated_step_makes_the_whole_batch_codebook_update(kind):
    images = _images(8)
    tok = _tokenizer(kind)
    start, whole, m1 = _one_step(tok, images, accum_steps=1)
    _, accumulated, m2 = _one_step(tok, images, accum_steps=2)
    flat = [
        traverse_util.flatten_dict(s.model_state["variables"]["codebook"], sep="/") for s in (start, whole, accumulated)
    ]
    book0, book1, book2 = flat
    assert {k.rsplit("/", 1)[-1] for k in book1} == {"cluster_size", "embed_sum", "embedding"}
    for k in book1:
        np.testing.assert_allclose(np.asarray(book2[k]), np.asarray(book1[k]), **TOL, err_msg=k)
    # the update happened, and once: sum(cluster_size) = d * sum(start) + (1 - d) * N (N vectors in the batch)
    size = next(k for k in book1 if k.endswith("cluster_size"))
    n = 8 * (4 * 4 if kind == "vqgan" else 1 + 4 + 16)  # 8 px / 2 = 4 x 4 latents; MSVQ pools scales 1, 2, 4
    assert float(jnp.sum(book2[size])) == pytest.approx(0.8 * float(jnp.sum(book0[size])) + 0.2 * n, rel=1e-6)
    # every micro-batch looked up the step's starting codebook: the same loss and gradient as the whole batch
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)


def test_restarts_happen_once_per_step_and_are_counted_once():
    images = _images(8)
    tok = _tokenizer("vqgan", dead_code_threshold=0.9)
    _, whole, m1 = _one_step(tok, images, accum_steps=1)
    _, accumulated, m2 = _one_step(tok, images, accum_steps=2)
    assert float(m1["restarted_codes"]) > 0  # sizes start at 1: an unused code has 0.8 < 0.9 after the update
    assert float(m2["restarted_codes"]) == float(m1["restarted_codes"])
    book1 = whole.model_state["variables"]["codebook"]["quantize"]
    book2 = accumulated.model_state["variables"]["codebook"]["quantize"]
    dead = np.asarray(book1["cluster_size"]) == np.float32(0.9)  # a restarted code's size is the threshold
    assert dead.sum() == float(m1["restarted_codes"])
    np.testing.assert_array_equal(np.asarray(book2["cluster_size"]) == np.float32(0.9), dead)
    live = ~dead
    np.testing.assert_allclose(np.asarray(book2["cluster_size"])[live], np.asarray(book1["cluster_size"])[live], **TOL)
    np.testing.assert_allclose(np.asarray(book2["embedding"])[live], np.asarray(book1["embedding"])[live], **TOL)


def test_micro_batch_context_is_exact_at_the_quantizer():
    """Two calls inside micro_batch(0, 2), micro_batch(1, 2) == one call on both halves; outside a context each call
    is a whole update (the behaviour every single-step caller keeps)."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(4, 2, 2, 4)), jnp.float32)
    m = VectorQuantizer(8, 4, l2_norm=False, ema_decay=0.7)
    variables = m.init(jax.random.PRNGKey(0), z)
    update = lambda v, x: m.apply(v, x, mutable=["codebook"])[1]
    whole = update(variables, z)
    state = variables
    for i, half in enumerate((z[:2], z[2:])):
        with micro_batch(i, 2):
            state = {**variables, **update(state, half)}
        if i == 0:  # not yet applied: the lookups of micro-batch 1 use the starting codebook
            np.testing.assert_array_equal(state["codebook"]["embedding"], variables["codebook"]["embedding"])
    for k in ("cluster_size", "embed_sum", "embedding"):
        np.testing.assert_allclose(np.asarray(state["codebook"][k]), np.asarray(whole["codebook"][k]), **TOL)
    twice = update({**variables, **update(variables, z[:2])}, z[2:])  # no context: two updates
    assert not np.allclose(np.asarray(twice["codebook"]["cluster_size"]), np.asarray(whole["codebook"]["cluster_size"]))
