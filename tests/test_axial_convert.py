"""The Axial Transformer converter: the released ImageNet variable trees (names and shapes only), EMA copies over the
raw variables, strict name / shape checks with one-line errors, and the CLI's checkpoint read back."""

import json

import numpy as np
import pytest
from flax import traverse_util

from jaxgen.config_util import load_config
from jaxgen.convert import __main__ as convert_cli
from jaxgen.convert.axial import (
    EMA_SUFFIX,
    check_variable_list,
    config_from_spec,
    expected_variables,
    infer_axial_config,
    model_variables,
    tf_name,
)
from jaxgen.families import FAMILIES, param_shapes
from jaxgen.pretrained import check_tree_shapes, load_pretrained
from tests.conftest import REPO
from tests.helpers import AXIAL_FIXTURE_A, AXIAL_FIXTURES

needs_fixture = pytest.mark.needs_fixture(AXIAL_FIXTURE_A)


def _count(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@needs_fixture
@pytest.mark.parametrize("variant", ["imagenet32", "imagenet64"])
def test_released_variable_trees(variant):
    """Every variable upstream creates for the ImageNet configs maps onto configs/axial_imagenet.py's model, with its
    shape; the parameter counts are the release's."""
    released = json.loads((AXIAL_FIXTURES / f"released_{variant}_vars.json").read_text())
    shapes = {k: tuple(v) for k, v in released["variables"].items()}
    cfg = load_config(str(REPO / f"configs/axial_imagenet.py:{variant}"))
    family = FAMILIES["axial"]
    pixels, model = family.build(cfg.pixels, cfg.axial)
    read = infer_axial_config(shapes, num_heads=cfg.axial.num_heads)
    for field in ("height", "width", "channels", "hidden_size", "mlp_factor", "num_outer_layers", "num_inner_layers",
                  "num_exterior_layers"):  # fmt: skip
        assert getattr(read, field) == getattr(model.config, field), field
    check_variable_list(shapes, model.config)
    assert len(shapes) == released["num_trainable_variables"]
    assert _count(param_shapes(family, pixels, model)["axial"]) == released["num_params"]


def _fixture_variables(scope: str) -> dict[str, np.ndarray]:
    with np.load(AXIAL_FIXTURE_A) as f:
        return {k.removeprefix("axial/"): f[k] for k in f.files if k.startswith(f"axial/{scope}/")}


def _gray_variables() -> dict[str, np.ndarray]:
    return _fixture_variables("transformer2d")


def _by_tf_name(params: dict, scope: str) -> dict[str, np.ndarray]:
    """A converted param tree keyed by the TF names (`tf_name`), the one-channel model's under transformer2d/."""
    flat = traverse_util.flatten_dict(params)
    if scope == "transformer2d":
        flat = {k[1:]: v for k, v in flat.items()}
    return {tf_name(k, scope): np.asarray(v) for k, v in flat.items()}


@needs_fixture
@pytest.mark.parametrize(("scope", "heads", "channels"), [("transformer2d", 4, 1), ("ar_decoder", 4, 3)])
def test_cli_takes_the_ema_copies_and_reads_back(tmp_path, scope, heads, channels):
    """A training checkpoint's layout (raw variables, their EMA copies, global_step, Adam slots): the converted params
    are the EMA copies (the raw ones with --no-ema), and load_pretrained reads every one back; its config.json builds
    the model those params fit."""
    ema = _fixture_variables(scope)
    raw = {name: np.zeros_like(v) for name, v in ema.items()}
    ckpt = raw | {f"{name}{EMA_SUFFIX}": v for name, v in ema.items()} | {"global_step": np.int64(7)}
    ckpt |= {f"{name}/Adam{s}": np.ones_like(v) for name, v in ema.items() for s in ("", "_1")}
    np.savez(tmp_path / "ckpt.npz", **ckpt)
    for flags, want in (([], ema), (["--no-ema"], raw)):
        out = tmp_path / f"out{len(flags)}"
        rc = convert_cli.main(["axial", "--weights", str(tmp_path / "ckpt.npz"), "--num-heads", str(heads), *flags,
                               "--out", str(out)])  # fmt: skip
        assert rc == 0
        config, params = load_pretrained(out, family="axial")
        assert params["pixels"] == {} and config["pixels"] == {"channels": channels}
        assert config["axial"]["hidden_size"] == 32 and config["axial"]["num_heads"] == heads
        got = _by_tf_name(params["axial"], scope)
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            assert got[name].dtype == np.float32
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        pixels, model = FAMILIES["axial"].build(config["pixels"], config["axial"])
        shapes = param_shapes(FAMILIES["axial"], pixels, model)
        check_tree_shapes(params, shapes, "the converted checkpoint")
    assert set(model_variables(ckpt)) == set(ema)


@needs_fixture
def test_config_flag_and_its_disagreements(capsys):
    """--config gives the heads (and dropout, ...); a config of another size, conflicting --num-heads and an EMA copy
    for only some variables are each one error."""
    released = json.loads((AXIAL_FIXTURES / "released_imagenet32_vars.json").read_text())
    shapes = {k: tuple(v) for k, v in released["variables"].items()}
    spec = str(REPO / "configs/axial_imagenet.py:imagenet32")
    config = config_from_spec(spec, shapes)
    want = load_config(spec).axial
    assert (config.num_heads, config.dropout, config.hidden_size, config.channels) == (16, want.dropout, 1536, 3)
    assert config_from_spec(spec, shapes, num_heads=16) == config
    with pytest.raises(ValueError, match="--num-heads 8 but"):
        config_from_spec(spec, shapes, num_heads=8)
    with pytest.raises(ValueError, match=r"another model than the variables: axial.height=64 \(the variables: 32\)"):
        config_from_spec(str(REPO / "configs/axial_imagenet.py:imagenet64"), shapes)
    variables = _gray_variables()
    partial = variables | {f"{n}{EMA_SUFFIX}": v for n, v in list(variables.items())[:5]}
    with pytest.raises(ValueError, match=r"5 have an ExponentialMovingAverage copy but 98 do not.*--no-ema"):
        model_variables(partial)
    assert set(model_variables(partial, ema=False)) == set(variables)


@needs_fixture
def test_bad_variable_lists_are_one_clear_error(tmp_path, capsys):
    variables = _gray_variables()
    shapes = {k: tuple(v.shape) for k, v in variables.items()}
    config = infer_axial_config(shapes, num_heads=4)
    check_variable_list(shapes, config)
    assert set(expected_variables(config)) == set(shapes)
    missing = dict(shapes)
    del missing["transformer2d/inner_row_1/mlp/proj_out/b"]
    with pytest.raises(ValueError, match=r"1 missing \(transformer2d/inner_row_1/mlp/proj_out/b\)"):
        check_variable_list(missing, config)
    wrong = dict(shapes) | {"transformer2d/outer_row_0/attn/k/w": (32, 16)}
    with pytest.raises(ValueError, match=r"1 with another shape \(transformer2d/outer_row_0/attn/k/w: \[32, 16\]"):
        check_variable_list(wrong, config)
    extra = dict(shapes) | {"transformer2d/outer_row_9/attn/k/w": (32, 32)}
    with pytest.raises(ValueError, match="1 unexpected"):
        check_variable_list(extra, config)
    np.savez(tmp_path / "v.npz", **{k: v for k, v in variables.items() if "inner_row_1/mlp/proj_out/b" not in k})
    assert convert_cli.main(["axial", "--weights", str(tmp_path / "v.npz"), "--num-heads", "4", "--out",
                             str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 missing" in err
    assert convert_cli.main(["axial", "--weights", str(tmp_path / "v.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "--num-heads" in capsys.readouterr().err
