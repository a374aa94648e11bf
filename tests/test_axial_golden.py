"""The golden check against the official TF Axial Transformer's outputs (../shared/fixtures/axial): both models'
teacher-forcing logits, NLL and bits per dim, the samples for the fixture's Gumbel noise (the cached sampler) and the
intermediate activations, through the converter. And the runner on a fixture of other sizes (made here, no reference
values): every size comes from the JSON, and the cached sampler agrees with teacher forcing."""

import json

import numpy as np
import pytest

from jaxgen.convert import verify
from jaxgen.convert.axial import expected_variables
from jaxgen.convert.axial_fixture import run_axial_fixture
from jaxgen.models.generators.axial import AxialConfig
from tests.helpers import AXIAL_FIXTURE_A

needs_fixture = pytest.mark.needs_fixture(AXIAL_FIXTURE_A)  # skipped if absent; in CI (.ci/run) a failure


@needs_fixture
def test_fixture_a_matches_official_outputs(tmp_path, capsys):
    dump = tmp_path / "ours.npz"
    rc = verify.main(["--family", "axial", str(AXIAL_FIXTURE_A), "--dump", str(dump)])
    report = json.loads(capsys.readouterr().out)
    bad = {k: v for k, v in report["outputs"].items() if not v["ok"]}
    assert rc == 0 and report["ok"], bad
    with np.load(AXIAL_FIXTURE_A) as ref, np.load(dump) as ours:
        out_keys = sorted(k for k in ref.files if k.startswith("out/"))
        assert sorted(ours.files) == out_keys  # every reference output is produced, under the same name
        for k in out_keys:
            assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
            if not np.issubdtype(ref[k].dtype, np.floating):  # the samples: exact
                np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
            else:  # README: 1e-4 relative to max(1, |ref|); measured <= 7.6e-6 (gray nll), logits <= 4.8e-6
                np.testing.assert_allclose(ours[k], ref[k], atol=1e-4 * max(1.0, float(np.abs(ref[k]).max())),
                                           rtol=0, err_msg=k)  # fmt: skip
        for kind in ("gray", "rgb"):  # bits per dim: the README suggests 1e-5
            np.testing.assert_allclose(ours[f"out/{kind}/bpd"], ref[f"out/{kind}/bpd"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(ours[f"out/{kind}/logits"], ref[f"out/{kind}/logits"], atol=1e-4, rtol=0)
            assert ours[f"out/{kind}/sample_margin"].min() > 0.02  # the margin floor: no sample is a near tie


# -- a fixture of other sizes (non-square, odd inner layers, batch 3), in the official layout ----------------------

GRAY = dict(name="transformer2d", num_embs=256, img_height=5, img_width=7, emb_dim=16, num_heads=2, hdim_factor=3,
            num_outer_layers=2, num_inner_layers=3)  # fmt: skip
RGB = dict(name="ar_decoder", num_embs=256, img_height=4, img_width=3, img_channels=3, emb_dim=8, num_heads=2,
           hdim_factor=2, num_exterior_layers=4, num_outer_layers=4, num_inner_layers=1)  # fmt: skip


def _config(ctor: dict) -> AxialConfig:
    return AxialConfig(height=ctor["img_height"], width=ctor["img_width"], channels=ctor.get("img_channels", 1),
                       hidden_size=ctor["emb_dim"], num_heads=ctor["num_heads"], mlp_factor=ctor["hdim_factor"],
                       num_outer_layers=ctor["num_outer_layers"], num_inner_layers=ctor["num_inner_layers"],
                       num_exterior_layers=ctor.get("num_exterior_layers", 0))  # fmt: skip


def _random_variables(config: AxialConfig, rng) -> dict[str, np.ndarray]:
    """TF-named random weights with no branch at zero (the fixture README's recipe, roughly)."""
    out = {}
    for name, shape in expected_variables(config).items():
        z = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("/w"):
            z = z / np.sqrt(np.prod(shape[:-1]))
        elif name.endswith("/g"):
            z = 1 + 0.1 * z
        elif name.endswith("/b"):
            z = 0.1 * z
        else:  # embs, pos_embs_*
            z = 3 * z / np.sqrt(shape[-1])
        out[f"axial/{name}"] = z
    return out


STEPS = ("layernorm_attn", "q", "k", "v", "attn_probs", "attn_heads", "attn_branch", "resid_mid", "layernorm_mlp",
         "mlp_branch", "out")  # fmt: skip


def _fixture_names(kind: str, ctor: dict) -> list[str]:
    """The README's `out/` names for a model of these sizes (sub-steps for the first block of each kind)."""
    names = [f"{kind}/{n}" for n in ("logits", "nll", "bpd", "samples", "sample_logits", "sample_margin")]
    pairs = lambda p, n: [f"{p}_{t}_{i}" for i in range(n // 2) for t in ("row", "col")]
    blocks = pairs("outer", ctor["num_outer_layers"]) + [f"inner_row_{i}" for i in range(ctor["num_inner_layers"])]
    top = ["emb", "outer_in", "u", "inner_in", "inner_out", "final_ln"]
    firsts = ("outer_row_0", "outer_col_0", "inner_row_0")
    if kind == "rgb":
        blocks += pairs("exterior", ctor["num_exterior_layers"])
        top += ["ext_input_planes", "ext_conv", "ext_in", "cond"]
        firsts = ("exterior_row_0", "exterior_col_0")
    acts = top + [f"{blk}/{s}" for blk in blocks for s in (STEPS if blk in firsts else ("out",))]
    if kind == "gray":
        return names + [f"gray/act/{a}" for a in [*acts, "pos_embs"]]
    return names + [f"rgb/act/c{k}/{a}" for k in range(ctor["img_channels"]) for a in acts]


def test_runner_reads_every_size_off_the_fixture(tmp_path):
    """Sizes from the JSON only; the fixture's names (placeholders here) decide which activations come back."""
    rng = np.random.default_rng(0)
    b = 3
    arrays, names = {}, []
    for kind, ctor in (("gray", GRAY), ("rgb", RGB)):
        c = _config(ctor)
        arrays |= _random_variables(c, rng)
        pix = (b, c.height, c.width) + ((c.channels,) if kind == "rgb" else ())
        arrays[f"in/{kind}/x"] = rng.integers(0, 256, pix).astype(np.int32)
        u = rng.uniform(1e-9, 1.0, (*pix, 256))
        arrays[f"in/{kind}/noise"] = (-np.log(-np.log(u))).astype(np.float32)
        names += _fixture_names(kind, ctor)
    fixture = tmp_path / "axial_fixture_Z.npz"
    np.savez(fixture, **arrays, **{f"out/{n}": np.zeros(()) for n in names})

    out = run_axial_fixture(fixture, {"gray_ctor": GRAY, "rgb_ctor": RGB})
    assert sorted(out) == sorted(names)
    for kind, ctor in (("gray", GRAY), ("rgb", RGB)):
        h, w, nh, d = ctor["img_height"], ctor["img_width"], ctor["num_heads"], ctor["emb_dim"]
        pix = (b, h, w) + ((3,) if kind == "rgb" else ())
        assert out[f"{kind}/logits"].shape == (*pix, 256) and out[f"{kind}/bpd"].shape == (b,)
        assert out[f"{kind}/nll"].shape == pix and out[f"{kind}/sample_margin"].shape == pix
        assert out[f"{kind}/samples"].shape == pix and out[f"{kind}/samples"].dtype == np.int32
        np.testing.assert_allclose(out[f"{kind}/bpd"], out[f"{kind}/nll"].reshape(b, -1).mean(1) / np.log(2), rtol=1e-6)
        perturbed = out[f"{kind}/sample_logits"] + arrays[f"in/{kind}/noise"]
        # The cached sampler against teacher forcing on its own samples (the README's check on upstream's sampler).
        np.testing.assert_array_equal(np.argmax(perturbed, -1), out[f"{kind}/samples"])
        assert out[f"{kind}/sample_margin"].min() >= 0
        for name in (n for n in out if n.startswith(f"{kind}/act/") and n.endswith("/attn_probs")):
            probs, block = out[name], name.split("/")[-2]
            assert probs.shape == (b, h, w, nh, w if "_row_" in block else h), name
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
            assert out[name.replace("attn_probs", "q")].shape == (b, h, w, nh, d // nh)
            if block.startswith(("outer_col", "inner")):  # causal: a later key's weight is exactly 0
                length = probs.shape[-1]
                later = np.arange(length)[None, :] > np.arange(length)[:, None]
                along = probs if "_row_" in block else np.swapaxes(probs, 1, 2)  # [B, other, own, heads, L]
                assert np.all(np.moveaxis(along, 3, 1)[:, :, :, later] == 0), name
    assert out["gray/act/pos_embs"].shape == (5, 7, 16)
    np.testing.assert_array_equal(out["gray/act/inner_out"], out["gray/act/inner_row_2/out"])
