"""MaskGIT's masked-token objective (`jaxgen.families.maskgit`), the training code Google did not release: the
masked count per sample, the loss on the masked positions only with label smoothing, label dropout, and that it
trains; plus the family's config checks."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen.families import get_family
from jaxgen.families.maskgit import build, mask_tokens, masked_token_loss, objective
from jaxgen.sampling.mask_schedule import masked_count

FAMILY = get_family("maskgit")
VQ = dict(codebook_size=32, embedding_dim=8, filters=32, channel_multipliers=(1, 2), num_res_blocks=1)
MODEL = dict(num_classes=4, num_tokens=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def test_masked_count_per_sample_is_ceil_of_the_schedule():
    key = jax.random.key(3)
    tokens = jnp.zeros((512, 16), jnp.int32)
    masked = mask_tokens(key, tokens, "cosine")
    ratio = jax.random.uniform(jax.random.split(key)[0], (512,))
    want = np.ceil(np.cos(np.pi / 2 * np.asarray(ratio, np.float64)) * 16).clip(1, 16)
    np.testing.assert_array_equal(np.asarray(masked.sum(1)), masked_count(ratio, 16, "cosine"))
    assert np.array_equal(np.asarray(masked.sum(1)), want)  # no row of these 512 is near an integer boundary
    # E[ceil(16 cos(pi r / 2))] / 16 over r ~ U[0, 1): 2/pi + about 1/32 = 0.668; 512 rows: sd 0.013
    assert abs(float(masked.mean()) - (2 / np.pi + 1 / 32)) < 0.04
    # which positions: uniformly spread (each position masked in about the same share of rows)
    per_position = np.asarray(masked.mean(0))
    assert per_position.min() > 0.55 and per_position.max() < 0.8, per_position


def test_loss_reads_only_masked_positions_with_label_smoothing():
    k = 8
    logits = jax.random.normal(jax.random.key(0), (2, 5, k))
    tokens = jnp.array([[1, 2, 3, 4, 5], [0, 7, 6, 5, 4]])
    masked = jnp.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
    loss, acc = masked_token_loss(logits, tokens, masked, 0.1)
    logp = jax.nn.log_softmax(logits)
    target = 0.9 * jax.nn.one_hot(tokens, k) + 0.1 / k
    want = -(target * logp).sum(-1)[masked].mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    changed = logits.at[0, 1, 2].add(5.0).at[1, 0, 0].add(-3.0)  # unmasked positions: no effect
    assert float(masked_token_loss(changed, tokens, masked, 0.1)[0]) == pytest.approx(float(loss), rel=1e-6)
    changed = logits.at[0, 0, 1].add(5.0)  # a masked position: changes the loss
    assert abs(float(masked_token_loss(changed, tokens, masked, 0.1)[0]) - float(loss)) > 1e-3
    assert float(acc) == pytest.approx(float((jnp.argmax(logits, -1) == tokens)[masked].mean()))


def _loss_fn(**model):
    vq, gen = build(VQ, MODEL | model)
    params = gen.init(jax.random.key(0), *FAMILY.generator_inputs(gen))["params"]
    return gen, params, objective(vq, gen)


def test_objective_trains_on_a_fixed_batch():
    _, params, loss_fn = _loss_fn(dropout=0.0, attention_dropout=0.0)
    batch = {
        "tokens": jax.random.randint(jax.random.key(1), (8, 16), 0, 32),
        "label": jnp.arange(8, dtype=jnp.int32) % 4,
    }
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        ctx = types.SimpleNamespace(rng=key, model_state={}, frozen=None)
        (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, ctx)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss, metrics

    losses = []
    for i in range(120):
        params, state, loss, metrics = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    # a random batch of 8 x 16 ids is being memorised: the masked-token loss falls from ~ln 32 = 3.47 (measured:
    # 3.47 -> 1.59 as the mean of steps 110-119; the label-smoothing floor is ~0.65)
    assert losses[0] > 3.0 and np.mean(losses[-10:]) < 0.6 * losses[0], losses[::10]
    assert 0.0 < float(metrics["masked_fraction"]) <= 1.0


def test_label_dropout_feeds_the_null_class_token():
    """With class_dropout_prob 1 every class token is the null class's: the loss no longer depends on the label."""
    gen, params, loss_fn = _loss_fn(class_dropout_prob=0.999999, dropout=0.0, attention_dropout=0.0)
    assert gen.config.vocab_size == 32 + 4 + 1 + 1 and gen.config.mask_id == 37
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 32)
    ctx = types.SimpleNamespace(rng=jax.random.key(5), model_state={}, frozen=None)
    a = loss_fn(params, {"tokens": tokens, "label": jnp.array([0, 1, 2, 3])}, ctx)[0]
    b = loss_fn(params, {"tokens": tokens, "label": jnp.array([3, 3, 0, 1])}, ctx)[0]
    assert float(a) == float(b)
    gen, params, loss_fn = _loss_fn(dropout=0.0, attention_dropout=0.0)  # no null class: the label matters
    a = loss_fn(params, {"tokens": tokens, "label": jnp.array([0, 1, 2, 3])}, ctx)[0]
    b = loss_fn(params, {"tokens": tokens, "label": jnp.array([3, 3, 0, 1])}, ctx)[0]
    assert float(a) != float(b)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mask_schedule", "linear", "schedule"),
        ("label_smoothing", 1.0, "label_smoothing"),
        ("num_heads", 3, "num_heads"),
        ("codebook_size", 64, "codebook_size"),  # the tokenizer has 32 codes
        ("attn_backend", "flash", "backend"),
    ],
)
def test_bad_generator_sections_fail_in_one_line(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        build(VQ, MODEL | {field: value})
    assert "\n" not in str(e.value)


def test_attention_dropout_needs_the_xla_backend():
    with pytest.raises(ValueError, match="attention_dropout"):
        build(VQ, MODEL | {"attn_backend": "pallas", "attention_dropout": 0.1})
    build(VQ, MODEL | {"attn_backend": "pallas", "attention_dropout": 0.0})


def test_token_count_must_match_the_image_size():
    vq, gen = build(VQ, MODEL)
    assert FAMILY.image_size(vq, gen) == math.isqrt(16) * 2
    FAMILY.check(vq, gen, 8)
    with pytest.raises(ValueError, match=r"maskgit\.num_tokens"):
        FAMILY.check(vq, gen, 16)  # 8 x 8 = 64 tokens


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.sampling.schedule=linear", "schedule"),
        ("--config.sampling.num_iter=17", "more decode steps than tokens"),
        ("--config.sampling.cfg_scale=2.0 --config.maskgit.class_dropout_prob=0.0", "null class"),
    ],
)
def test_a_bad_sampling_section_fails_before_training(override, message):
    from jaxgen.config_util import load_config
    from jaxgen.train.checks import check_config
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "configs/digits_maskgit.py:smoke"))
    for item in override.split():
        field, value = item.removeprefix("--config.").split("=")
        section, name = field.split(".")
        cfg[section][name] = type(cfg[section][name])(value) if not isinstance(cfg[section][name], str) else value
    with pytest.raises(ValueError, match=message) as e:
        check_config(cfg)
    assert str(e.value).startswith("config.sampling: ") and "\n" not in str(e.value)


def test_training_forward_applies_dropout_and_eval_does_not():
    """train=True with the release's dropout (hidden 0.1, attention probabilities 0.1): keyed, and off in eval."""
    gen, params, _ = _loss_fn(dropout=0.1, attention_dropout=0.1)
    ids = jnp.concatenate([jnp.full((2, 1), 32), jnp.full((2, 16), -1)], axis=1)
    run = lambda key: gen.apply({"params": params}, ids, train=True, rngs={"dropout": key})
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert np.array_equal(a, run(jax.random.key(0))) and not np.allclose(a, b)
    assert np.array_equal(gen.apply({"params": params}, ids), gen.apply({"params": params}, ids, train=False))
