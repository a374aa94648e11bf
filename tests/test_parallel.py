"""Sharding: the mesh, the rule table, the models' logical-axis boxes, params born sharded (same values as the
unsharded init), sharded forwards equal to single-device ones, train-state shardings through optax, global batches,
and the fallback for mesh axes that do not divide a dimension. 8 fake CPU devices (conftest)."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.config_util import load_config
from jaxgen.families import example_image, family_of, param_shapes
from jaxgen.models.registry import init_params
from jaxgen.models.tokenizers.convnets import conv
from jaxgen.parallel import distributed
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel.logical import keep_logical_boxes, logical
from jaxgen.parallel.partition import (
    abstract_boxed,
    abstract_boxed_params,
    activation_rules,
    batch_sharding,
    fit_spec,
    init_sharded,
    shard_batch,
    strip_boxes,
    tree_shardings,
)
from jaxgen.parallel.rules import DEFAULT_RULES, rules_from_config, rules_to_config
from tests.helpers import random_params

REPO = Path(__file__).resolve().parents[1]
RULES = DEFAULT_RULES
is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)


@functools.cache
def _family(name):
    """(family, tokenizer, generator, tokenizer init args, generator init args) of configs/{name}.py."""
    cfg = load_config(str(REPO / f"configs/{name}.py"))
    fam = family_of(cfg)
    tok, gen = fam.build(cfg[fam.tokenizer_key], cfg[fam.generator_key])
    return fam, tok, gen, (example_image(fam, tok, gen),), fam.generator_inputs(gen)


@functools.cache
def _mesh222():
    return mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# ---- mesh and rules -----------------------------------------------------------------------------------------------


def test_create_mesh_shapes():
    assert jax.device_count() == 8
    for axes, shape in [
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "tensor": 2}, (4, 1, 2)),  # missing axes are 1
        ({"fsdp": -1}, (1, 8, 1)),
    ]:
        m = mesh_lib.create_mesh(axes)
        assert m.axis_names == ("data", "fsdp", "tensor")
        assert tuple(m.devices.shape) == shape, axes
        assert all(t == AxisType.Auto for t in m.axis_types)
    assert mesh_lib.create_mesh({"data": -1}, devices=jax.devices()[:2]).devices.shape == (2, 1, 1)


@pytest.mark.parametrize(
    "axes, match",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, r"needs 3 devices but there are 8"),
        ({"data": 2, "fsdp": 2, "tensor": 4}, r"needs 16 devices but there are 8"),
        ({"data": -1, "fsdp": 3}, r"\(3 devices\) do not divide the 8 devices"),
        ({"data": -1, "fsdp": -1}, r"at most one -1"),
        ({"data": 0}, r"positive"),
        ({"model": 8}, r"unknown axes \['model'\]"),
    ],
)
def test_create_mesh_errors(axes, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.create_mesh(axes)


def test_rules_round_trip_through_config():
    as_config = rules_to_config()
    assert as_config[0] == ["batch", ["data", "fsdp"]]
    assert rules_from_config(as_config) == DEFAULT_RULES
    assert rules_from_config([list(r) for r in DEFAULT_RULES]) == DEFAULT_RULES  # what config files write
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        rules_from_config([["mlp", "model"]])
    with pytest.raises(ValueError, match="pair"):
        rules_from_config([["mlp"]])


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "MEGASCALE_COORDINATOR_ADDRESS",
                "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    assert not distributed.multi_process_env()
    assert distributed.initialize_distributed() is False
    assert distributed.initialize_distributed(distributed.DistributedSettings(num_processes=1)) is False
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.multi_process_env()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.multi_process_env()  # initialize_distributed() would now start jax.distributed
    for k in (*slurm, "SLURM_NTASKS"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert not distributed.multi_process_env()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.multi_process_env()


# ---- annotations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["var_tiny", "llamagen_tiny", "digits_maskgit", "digits_hmar"])
def test_every_param_is_boxed_with_known_names(name):
    """Inside keep_logical_boxes() every param of both models is a LogicallyPartitioned with one rule-table name
    (or None) per dimension; outside, init returns the same tree of plain shapes as before."""
    fam, tok, gen, tok_in, gen_in = _family(name)
    known = {n for n, _ in RULES}
    plain = param_shapes(fam, tok, gen)
    for key, module, args in ((fam.tokenizer_key, tok, tok_in), (fam.generator_key, gen, gen_in)):
        boxed = abstract_boxed_params(module, jax.random.key(0), *args)
        leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
        assert len(leaves) == len(jax.tree.leaves(plain[key]))
        for path, leaf in leaves:
            where = jax.tree_util.keystr(path)
            assert isinstance(leaf, nn.LogicallyPartitioned), f"{key}{where} has no logical axis names"
            assert len(leaf.names) == leaf.value.ndim, f"{key}{where}: {leaf.names} for {leaf.value.shape}"
            assert set(leaf.names) - {None} <= known, f"{key}{where}: {leaf.names} not all in the rules"
        assert jax.tree.map(lambda s: (s.shape, s.dtype), strip_boxes(boxed)) == jax.tree.map(
            lambda s: (s.shape, s.dtype), plain[key]
        )
        unboxed_init = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]  # outside the context
        assert not any(is_box(x) for x in jax.tree.leaves(unboxed_init, is_leaf=is_box))


def test_boxing_context_is_part_of_the_jit_cache_key():
    """A function traced outside keep_logical_boxes() is re-traced inside it (not reused without its boxes)."""
    dense = nn.Dense(4, kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "mlp")))
    init = jax.jit(lambda k: dense.init(k, jnp.zeros((1, 2)))["params"])
    assert not is_box(init(jax.random.key(0))["kernel"])
    with keep_logical_boxes():
        boxed = init(jax.random.key(0))["kernel"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ("embed", "mlp")


def test_constraints_only_under_mesh_and_rules():
    """The models' activation constraints are absent from the program outside `activation_rules` and present
    inside it (the CPU suite's outputs are unchanged by them)."""
    fam, tok, gen, _, gen_in = _family("llamagen_tiny")
    params = param_shapes(fam, tok, gen)["gpt"]
    fwd = lambda p, lab, tok: gen.apply({"params": p}, lab, tok)
    count = lambda: jax.jit(fwd).lower(params, *gen_in).as_text().count("sharding_constraint")
    assert count() == 0
    with nn.logical_axis_rules(RULES):  # rules without a mesh: still nothing
        assert count() == 0
    with activation_rules(_mesh222(), RULES):
        assert count() > 0


# ---- shardings ------------------------------------------------------------------------------------------------------


def test_fit_spec_drops_axes_that_do_not_divide():
    m = _mesh222()
    assert fit_spec(P(("data", "fsdp"), "tensor"), (8, 4), m) == P(("data", "fsdp"), "tensor")
    assert fit_spec(P(("data", "fsdp"), "tensor"), (6, 3), m) == P(("data",), None)
    assert fit_spec(P(None, "fsdp"), (4, 3, 5), m) == P(None, None, None)
    with pytest.raises(ValueError, match="more entries"):
        fit_spec(P("data", None), (4,), m)


def test_non_dividing_conv_falls_back_to_replicated():
    """fsdp=8: a conv with 16 output channels is split 8 ways, one with 3 (an RGB output) is replicated."""
    mesh = mesh_lib.create_mesh({"data": 1, "fsdp": -1, "tensor": 1})

    class TwoConvs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return conv(3, 3, name="rgb")(conv(16, 3, name="wide")(x))

    x = jnp.zeros((1, 4, 4, 3))
    params = init_sharded(lambda k: TwoConvs().init(k, x)["params"], mesh, RULES, jax.random.key(0))
    wide, rgb = params["wide"]["kernel"], params["rgb"]["kernel"]
    assert wide.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in wide.addressable_shards} == {(3, 3, 3, 2)}
    assert rgb.sharding.spec == P(None, None, None, None) and rgb.sharding.is_fully_replicated
    assert params["rgb"]["bias"].sharding.is_fully_replicated
    assert params["wide"]["bias"].sharding.spec == P("fsdp")


def _train_state_fn(module, init_args, tx):
    def init_state(key):
        params = module.init(key, *init_args)["params"]
        return {
            "params": params,
            "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }

    return init_state


def test_train_state_born_sharded_with_the_init_values():
    """A whole train state (params, AdamW state with a decay mask, EMA, step, rng) of the tiny VAR on
    data=2 x fsdp=2 x tensor=2: optax keeps the boxes, so mu / nu / EMA are sharded like the params; scalars are
    replicated; params and moments come out bitwise equal to the unsharded init."""
    _, _, gen, _, gen_in = _family("var_tiny")
    mesh = _mesh222()
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.05, mask=decay_mask))
    init_state = _train_state_fn(gen, gen_in, tx)
    key = jax.random.key(3)

    abstract = abstract_boxed(init_state, key)
    shardings = tree_shardings(abstract, mesh, RULES)
    plain = jax.eval_shape(init_state, key)  # outside keep_logical_boxes(): no boxes
    assert jax.tree.structure(shardings) == jax.tree.structure(plain)
    adam = shardings["opt_state"][1][0]  # chain -> adamw chain -> ScaleByAdamState
    fc1 = ("blocks_0", "ffn", "fc1", "kernel")
    get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)
    for tree in (shardings["params"], adam.mu, adam.nu, shardings["ema"]):
        assert get(tree, fc1).spec == P("fsdp", "tensor")
    assert all(s.is_fully_replicated for s in (adam.count, shardings["step"], shardings["rng"]))

    state = init_sharded(init_state, mesh, RULES, key)
    kernel = get(state["params"], fc1)  # [64, 256]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 128)}
    assert get(state["params"], ("blocks_0", "attn", "proj", "kernel")).sharding.spec == P("tensor", "fsdp")
    assert state["params"]["head"]["kernel"].sharding.spec == P("fsdp", "tensor")

    reference = init_params(gen, key, *gen_in)  # the unsharded init (jaxgen.models.registry)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got in jax.tree.leaves(state["opt_state"]):
        assert not np.any(np.asarray(got))  # zero moments and count


@pytest.mark.parametrize(
    "tx",
    [
        optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),  # boxed MaskedNode()s
        optax.adafactor(1e-3),  # factored moments: boxes whose values lost a dimension
    ],
    ids=["masked_adam", "adafactor"],
)
def test_optax_states_get_shardings_of_the_unboxed_structure(tx):
    mesh = _mesh222()
    dense = nn.Dense(
        8,
        kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=logical(nn.initializers.zeros_init(), ("mlp",)),
    )

    def init(key):
        params = dense.init(key, jnp.zeros((1, 4)))["params"]
        return {"params": params, "opt_state": tx.init(params)}

    shardings = tree_shardings(abstract_boxed(init, jax.random.key(0)), mesh, RULES)
    assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(init, jax.random.key(0)))
    state = init_sharded(init, mesh, RULES, jax.random.key(0))
    assert state["params"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert P("fsdp", "tensor") in [x.sharding.spec for x in jax.tree.leaves(state["opt_state"])]  # mu, nu / v


def test_tree_shardings_refuses_a_tree_without_boxes():
    gen, gen_in = _family("llamagen_tiny")[2::2]
    plain = jax.eval_shape(lambda k: gen.init(k, *gen_in)["params"], jax.random.key(0))
    with pytest.raises(ValueError, match="abstract_boxed"):
        tree_shardings(plain, _mesh222(), RULES)


def test_batch_sharding_and_shard_batch():
    mesh = _mesh222()
    assert batch_sharding(mesh, RULES, 3).spec == P(("data", "fsdp"), None, None)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (8, 15)).astype(np.int32), "label": np.arange(8, dtype=np.int32)}
    sharded = shard_batch(batch, mesh, RULES)
    assert sharded["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in sharded["tokens"].addressable_shards} == {(2, 15)}
    np.testing.assert_array_equal(np.asarray(sharded["tokens"]), batch["tokens"])
    np.testing.assert_array_equal(np.asarray(sharded["label"]), batch["label"])
    with pytest.raises(ValueError, match="batch of 6 does not split into its 4 batch shards"):
        shard_batch({"label": np.arange(6)}, mesh, RULES)


# ---- sharded forward == single-device forward --------------------------------------------------------------------

# float32 logits (matmul precision "highest", conftest): the sharded program splits the contractions over 'fsdp' /
# 'tensor' and adds the partial sums across devices, a different float32 summation order than one device's. We
# measure at most 2.9e-6 absolute on logits up to |6.5| (VAR), 2.1e-6 on |4.2| (LlamaGen) and 3.5e-5 on |42|
# (MaskGIT, random params through its tied head), 4e-7 .. 8.3e-7 of the largest logit: atol is relative to it.
FORWARD_TOL = dict(rtol=1e-5, atol=2e-6)  # atol x max |logit|


@pytest.mark.parametrize("name", ["var_tiny", "llamagen_tiny", "digits_maskgit", "digits_hmar"])
def test_sharded_forward_equals_single_device(name):
    fam, tok, gen, _, gen_in = _family(name)
    mesh = _mesh222()
    params = random_params(param_shapes(fam, tok, gen)[fam.generator_key], seed=1)
    rng = np.random.default_rng(0)
    b = 8
    labels = rng.integers(0, 10, (b,)).astype(np.int32)
    if name in ("var_tiny", "digits_hmar"):
        x = rng.standard_normal((b, *gen_in[1].shape[1:])).astype(np.float32)
    elif name == "llamagen_tiny":
        x = rng.integers(0, gen.config.vocab_size, (b, gen_in[1].shape[1])).astype(np.int32)
    else:  # MaskGIT: image ids with the mask (-1) at random positions, after the class token
        x = rng.integers(-1, gen.config.codebook_size, (b, gen.config.num_tokens)).astype(np.int32)
    if name == "digits_maskgit":
        fwd = lambda p, lab, inp: gen.apply(
            {"params": p}, jnp.concatenate([gen.config.class_token(lab)[:, None], inp], 1)
        )
    else:
        fwd = lambda p, lab, inp: gen.apply({"params": p}, lab, inp)
    want = np.asarray(jax.jit(fwd)(params, labels, x))

    p_shard = tree_shardings(abstract_boxed_params(gen, jax.random.key(0), *gen_in), mesh, RULES)
    params_s = jax.device_put(params, p_shard)
    batch = shard_batch({"labels": labels, "x": x}, mesh, RULES)
    b_shard = (batch["labels"].sharding, batch["x"].sharding)
    with activation_rules(mesh, RULES):
        logits = jax.jit(fwd, in_shardings=(p_shard, *b_shard))(params_s, batch["labels"], batch["x"])
    assert logits.sharding.spec[0] == ("data", "fsdp")
    got = np.asarray(logits)
    assert np.abs(want).max() > 0.1  # random params: the logits are not trivially zero
    np.testing.assert_allclose(got, want, rtol=FORWARD_TOL["rtol"], atol=FORWARD_TOL["atol"] * np.abs(want).max())
    assert isinstance(logits.sharding, NamedSharding)
