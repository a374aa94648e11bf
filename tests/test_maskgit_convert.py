"""MaskGIT converter: the released trees (shapes only), a released-format file round trip against fixture A, the
leaf errors and the CLI hook."""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from jaxgen.convert.common import ConversionError, count_params
from jaxgen.convert.maskgit import (
    JAXGEN_CODEBOOK,
    UPSTREAM_CODEBOOK,
    add_convert_arguments,
    convert_checkpoints,
    convert_tokenizer,
    convert_transformer,
    infer_tokenizer_config,
    infer_transformer_config,
    read_flax_checkpoint,
    tokenizer_param_shapes,
    transformer_param_shapes,
)
from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.layer_stack import unrolled
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from tests.helpers import SHARED

REPO = Path(__file__).resolve().parents[1]
FIXTURES = SHARED / "fixtures" / "maskgit"
FIXTURE_A = FIXTURES / "maskgit_fixture_A.npz"
pytestmark = pytest.mark.needs_fixture(FIXTURE_A)


def released_tree(name: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(the tree JSON, {"params/...": shape})."""
    meta = json.loads((FIXTURES / f"released_maskgit_{name}_tree.json").read_text())
    return meta, {k: tuple(v["shape"]) for k, v in meta["leaves"].items()}


def _numel(shapes: dict) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _jaxgen_names(shapes):
    out = {k.removeprefix("params/"): s for k, s in shapes.items()}
    out[JAXGEN_CODEBOOK] = out.pop(UPSTREAM_CODEBOOK)
    return out


@pytest.mark.parametrize("size", [256, 512])
def test_released_tokenizer_tree(size):
    meta, shapes = released_tree(f"tokenizer_imagenet{size}")
    cfg = infer_tokenizer_config(shapes)
    expected = tokenizer_param_shapes(cfg)
    assert expected == _jaxgen_names(shapes)
    assert _numel(expected) == meta["num_parameters"] == 54_515_587
    ctor = meta["ctor"]
    assert (cfg.codebook_size, cfg.embedding_dim, cfg.filters, cfg.num_res_blocks) == (
        ctor["codebook_size"], ctor["embedding_dim"], ctor["filters"], ctor["num_res_blocks"])  # fmt: skip
    assert cfg.channel_multipliers == tuple(ctor["channel_multipliers"])
    assert (cfg.codebook_size, cfg.embedding_dim, cfg.filters, cfg.channel_multipliers, cfg.num_res_blocks) == (
        1024, 256, 128, (1, 1, 2, 2, 4), 2)  # fmt: skip


@pytest.mark.parametrize("size, count", [(256, 172_457_193), (512, 173_047_017)])
def test_released_transformer_tree(size, count):
    meta, shapes = released_tree(f"transformer_imagenet{size}")
    k = infer_tokenizer_config(released_tree(f"tokenizer_imagenet{size}")[1]).codebook_size
    cfg = infer_transformer_config(shapes, k)
    expected = transformer_param_shapes(cfg)
    assert expected == {p.removeprefix("params/"): s for p, s in shapes.items()}
    assert _numel(expected) == meta["num_parameters"] == count
    ctor = meta["ctor"]
    got = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.seq_len)
    assert got == (ctor["vocab_size"], ctor["hidden_size"], ctor["num_hidden_layers"], ctor["num_attention_heads"],
                   ctor["intermediate_size"], ctor["max_position_embeddings"])  # fmt: skip
    assert (cfg.num_classes, cfg.num_tokens, cfg.head_dim) == (1000, (size // 16) ** 2, 48)
    if size == 256:
        assert got == (2025, 768, 24, 16, 3072, 257)


# ---- a released-format file made from fixture A ------------------------------------------------------------------
def _write_flax(path, flat):
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    path.write_bytes(serialization.to_bytes({"params": nested}))
    return path


@pytest.fixture(scope="module")
def fixture_a():
    with np.load(FIXTURE_A) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixture_a):
    """(tokenizer file, transformer file) in the released format: to_bytes({"params": ...}), upstream's names."""
    d = tmp_path_factory.mktemp("maskgit")

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in fixture_a.items() if k.startswith(prefix)}

    tok = part("tokenizer/")
    assert UPSTREAM_CODEBOOK in tok
    return _write_flax(d / "tokenizer_ckpt", tok), _write_flax(d / "transformer_ckpt", part("transformer/"))


@pytest.fixture(scope="module")
def converted(files):
    tok_flat, tf_flat = read_flax_checkpoint(files[0]), read_flax_checkpoint(files[1])
    tok_cfg = infer_tokenizer_config(tok_flat)
    tf_cfg = infer_transformer_config(tf_flat, tok_cfg.codebook_size)
    return tok_cfg, tf_cfg, convert_tokenizer(tok_flat, tok_cfg), convert_transformer(tf_flat, tf_cfg)


def test_fixture_sizes_are_read_off_the_file(converted):
    tok_cfg, tf_cfg, tok_params, tf_params = converted
    meta = json.loads(FIXTURE_A.with_suffix(".json").read_text())
    assert tok_cfg.channel_multipliers == (1, 1, 2, 2, 4) and tok_cfg.filters == 32 and tok_cfg.codebook_size == 64
    assert (tf_cfg.vocab_size, tf_cfg.num_classes, tf_cfg.num_tokens, tf_cfg.num_heads) == (75, 10, 16, 4)
    assert count_params(tok_params) == meta["param_counts"]["tokenizer"]
    assert count_params(tf_params) == meta["param_counts"]["transformer"]
    leaves = traverse_util.flatten_dict(tf_params).values()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in leaves)


def test_converted_transformer_reproduces_the_logits(converted, fixture_a):
    _, tf_cfg, _, tf_params = converted
    ids = jnp.asarray(fixture_a["in/tf_input_ids"])
    logits = MaskedTransformer(tf_cfg).apply({"params": tf_params}, ids)
    np.testing.assert_allclose(np.asarray(logits), fixture_a["out/tf_logits"], atol=1e-4, rtol=0)


def test_converted_tokenizer_reproduces_the_indices(converted, fixture_a):
    tok_cfg, _, tok_params, _ = converted
    img = jnp.asarray(fixture_a["in/tok_image"]) * 2 - 1
    ids = MaskGITVQ(tok_cfg).apply({"params": tok_params}, img, method=MaskGITVQ.encode_ids)
    want = fixture_a["out/tok_indices"]
    np.testing.assert_array_equal(np.asarray(ids), want.reshape(want.shape[0], -1))


def test_npz_and_msgpack_read_alike(files):
    flat = read_flax_checkpoint(files[0])
    from_npz = read_flax_checkpoint(FIXTURE_A, prefix="tokenizer/")
    assert set(flat) == set(from_npz) and all(np.array_equal(flat[k], from_npz[k]) for k in flat)


# ---- errors -----------------------------------------------------------------------------------------------------
ATTN = "TransformerLayer_1/Attention_0/self_attention/query/kernel"


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda f: f.pop(ATTN), ["1 missing", ATTN]),
        (
            lambda f: f.update({"TransformerLayer_2/Mlp_0/layer_output/bias": np.zeros(64)}),
            ["1 unexpected", "TransformerLayer_2/Mlp_0/layer_output/bias"],
        ),
        (lambda f: f.update({ATTN: np.zeros((64, 4, 8))}), ["1 mis-shaped", ATTN, "(64, 4, 8)", "(64, 4, 16)"]),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_leaf_errors_name_the_leaf(files, converted, edit, words):
    flat = dict(read_flax_checkpoint(files[1]))
    edit(flat)
    with pytest.raises(ConversionError) as e:
        convert_transformer(flat, converted[1])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_one_error_names_every_bad_leaf(files, converted):
    tok_cfg = converted[0]
    flat = dict(read_flax_checkpoint(files[0]))
    del flat["encoder/Conv_0/kernel"], flat["decoder/ResBlock_4/Conv_2/kernel"]
    flat["encoder/Conv_9/kernel"] = np.zeros((1, 1, 3, 3))
    flat[UPSTREAM_CODEBOOK] = np.zeros((32, 16))
    with pytest.raises(ConversionError) as e:
        convert_tokenizer(flat, tok_cfg)
    msg = str(e.value)
    for w in ("2 missing", "encoder/Conv_0/kernel", "decoder/ResBlock_4/Conv_2/kernel", "1 unexpected",
              "encoder/Conv_9/kernel", "1 mis-shaped", JAXGEN_CODEBOOK):  # fmt: skip
        assert w in msg, msg


def test_a_config_of_other_sizes_says_which(files, converted):
    other = dataclasses.replace(converted[1], num_layers=3)
    with pytest.raises(ConversionError, match=r"(?s)16 missing.*num_layers=2 \(config 3\)") as e:
        convert_transformer(read_flax_checkpoint(files[1]), other)
    assert "TransformerLayer_2/" in str(e.value)


@pytest.mark.parametrize(
    "content", [b"not a checkpoint at all\n\x00\xff", serialization.to_bytes(3), b"PK\x03\x04" + bytes(64)]
)
@pytest.mark.parametrize("name", ["foreign.bin", "foreign.npz"])
def test_a_foreign_file_is_a_one_line_error(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="is not a Flax checkpoint") as e:
        read_flax_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_its_leaves_is_a_clear_error():
    with pytest.raises(ConversionError, match="not a MaskGIT tokenizer checkpoint"):
        infer_tokenizer_config({"Embed_0/word_embeddings/embedding": (75, 64)})
    with pytest.raises(ConversionError, match="too few for the tokenizer's 2024 codes"):
        infer_transformer_config(released_tree("transformer_imagenet256")[1], 2024)


# ---- the CLI hook -----------------------------------------------------------------------------------------------
def _args(*argv):
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return parser.parse_args(argv)


def test_convert_checkpoints_configs_rebuild_the_models(files):
    params, config = convert_checkpoints(_args("--tokenizer", str(files[0]), "--transformer", str(files[1])))
    assert set(params) == {"vq", "maskgit"} and config["family"] == "maskgit"
    config = json.loads(json.dumps(config, default=list))  # as config.json stores it
    tok_cfg, tf_cfg = MaskGITVQConfig(**config["vq"]), MaskedConfig(**config["maskgit"])
    for shapes, tree in ((tokenizer_param_shapes(tok_cfg), params["vq"]),
                         (transformer_param_shapes(tf_cfg), params["maskgit"])):  # fmt: skip
        assert shapes == {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}
    with pytest.raises(SystemExit):
        _args("--tokenizer", str(files[0]))  # --transformer is required


def _config_file(tmp_path, tok_cfg, tf_cfg, **maskgit):
    tok = {f: getattr(tok_cfg, f) for f in ("codebook_size", "embedding_dim", "filters", "channel_multipliers")}
    tf = {f: getattr(tf_cfg, f) for f in ("num_classes", "num_tokens", "hidden_size", "num_layers", "num_heads")}
    tf.update(intermediate_size=tf_cfg.intermediate_size, **maskgit)
    path = tmp_path / "maskgit_test.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config(arg=''):\n    cfg = ml_collections.ConfigDict()\n"
        f"    cfg.family = 'maskgit'\n    cfg.vq = dict({tok!r})\n    cfg.maskgit = dict({tf!r})\n    return cfg\n"
    )
    return str(path)


def test_convert_checkpoints_with_a_config(tmp_path, files, converted):
    tok_cfg, tf_cfg = converted[:2]
    spec = _config_file(tmp_path, tok_cfg, tf_cfg, dropout=0.0)
    _, config = convert_checkpoints(_args("--tokenizer", str(files[0]), "--transformer", str(files[1]),
                                          "--config", spec))  # fmt: skip
    assert config["maskgit"]["dropout"] == 0.0 and config["maskgit"]["codebook_size"] == tok_cfg.codebook_size
    bad = _config_file(tmp_path, tok_cfg, tf_cfg, codebook_size=32)
    with pytest.raises(ConversionError, match="transformer codebook_size 32 != tokenizer codebook_size 64"):
        convert_checkpoints(_args("--tokenizer", str(files[0]), "--transformer", str(files[1]), "--config", bad))


@pytest.mark.parametrize("size", [256, 512])
def test_the_release_config_gives_the_released_trees(size):
    """`--config configs/maskgit_imagenet.py:SIZE` builds the models the released files hold."""
    from jaxgen.convert.maskgit import _configs_from_file

    tok_cfg, tf_cfg = _configs_from_file(f"{REPO / 'configs/maskgit_imagenet.py'}:{size}")
    assert tokenizer_param_shapes(tok_cfg) == _jaxgen_names(released_tree(f"tokenizer_imagenet{size}")[1])
    tf_tree = {k.removeprefix("params/"): s for k, s in released_tree(f"transformer_imagenet{size}")[1].items()}
    assert tf_cfg.scan_layers  # the recipe scans its layers; the released tree is the unrolled layout
    assert transformer_param_shapes(unrolled(tf_cfg)) == tf_tree


def test_the_convert_binary_writes_a_checkpoint_that_decodes_as_upstream(tmp_path, files, fixture_a, capsys):
    """`python -m jaxgen.convert maskgit --tokenizer T --transformer M --out DIR`, then the family's sampler on the
    loaded checkpoint: the fixture's official decode (choice temperature 4.5, key 7), token for token."""
    from jaxgen.convert.__main__ import main as convert_main
    from jaxgen.families import family_models, get_family
    from jaxgen.pretrained import load_pretrained

    out = tmp_path / "ckpt"
    assert (
        convert_main(["maskgit", "--tokenizer", str(files[0]), "--transformer", str(files[1]), "--out", str(out)]) == 0
    )
    config, params = load_pretrained(out, family="maskgit")
    family = get_family(config["family"])
    vq, model = family_models(family, config)
    sampler = family.sampler(model, vq, dict(num_iter=8, choice_temperature=4.5, schedule="cosine"))
    sample = sampler(params["maskgit"], params["vq"], fixture_a["in/dec_labels"], jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(sample.tokens), fixture_a["out/dec_t4.5_final_seqs"][:, -1, 1:])

    broken = {k: v for k, v in read_flax_checkpoint(files[1]).items() if "mlm_bias" not in k}
    _write_flax(tmp_path / "broken", broken)
    capsys.readouterr()
    rc = convert_main(["maskgit", "--tokenizer", str(files[0]), "--transformer", str(tmp_path / "broken"),
                       "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "mlm_bias" in err and err.count("\n") <= 3, err
