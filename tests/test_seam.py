"""The family seam: one registry for every binary, the tokenizer protocol, the attention mask as a config field,
and the shared decode pieces (guidance, re-masking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert import verify
from jaxgen.convert.__main__ import main as convert_main
from jaxgen.families import FAMILIES, example_image, get_family
from jaxgen.families.llamagen import build as build_llamagen
from jaxgen.models.attention import attention_mask
from jaxgen.models.generators.next_scale import NextScaleConfig
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.models.tokenizers.protocol import Tokenizer
from jaxgen.models.tokenizers.titok import TiTok, TiTokConfig
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.sampling.guidance import guide, guide_from_uncond, split_guided, with_null_class
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.sampling.next_token import NextTokenSampler
from jaxgen.sampling.remask import mask_by_confidence
from tests.helpers import random_params, tiny_var

# ---- one registry ------------------------------------------------------------------------------------------------


def test_every_binary_reads_the_one_registry(capsys):
    families_with_golden = {n for n, f in FAMILIES.items() if f.golden is not None}
    assert families_with_golden == {"var", "llamagen", "maskgit", "hmar", "axial"}
    assert set(verify.GOLDEN) == families_with_golden | {"eval"}  # the evaluator's golden check is not a family
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    help_text = capsys.readouterr().out
    for name, family in FAMILIES.items():
        assert (name in help_text) == (family.convert is not None)
    with pytest.raises(ValueError, match="not one of"):
        get_family("pixelcnn")


# ---- the tokenizer protocol -------------------------------------------------------------------------------------


def _tokenizers():
    vae = tiny_var()[0]
    vq = VQGAN(VQConfig(codebook_size=16, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1))
    titok = TiTok(TiTokConfig(image_size=8, patch_size=4, width=32, depth=1, num_heads=2, num_latent_tokens=5,
                              codebook_size=16, codebook_embed_dim=4))  # fmt: skip
    maskgit_vq = MaskGITVQ(MaskGITVQConfig(codebook_size=16, embedding_dim=4, filters=32, channel_multipliers=(1, 2),
                                           num_res_blocks=1))  # fmt: skip
    return [(vae, vae.config.image_size), (vq, 8), (titok, 8), (maskgit_vq, 8)]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["msvq", "vqgan", "titok", "maskgit_vq"])
def test_tokenizers_encode_and_decode_ids_through_the_protocol(index):
    """encode_ids gives the layout's L ids in range; decoding them and encoding again gives the same ids (the codes
    are fixed points of quantisation only for the decoder-encoder pair after training, so the check is the one
    that holds at random weights: decode_ids(ids) equals decoding the quantised latents of the same image)."""
    tok, size = _tokenizers()[index]
    assert isinstance(tok, Tokenizer)
    layout = tok.token_layout(size)
    img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)), jnp.float32)
    params = random_params(jax.eval_shape(tok.init, jax.random.key(0), img)["params"], seed=index)
    ids = tok.apply({"params": params}, img, method="encode_ids")
    assert ids.shape == (2, layout.num_tokens) and ids.dtype == jnp.int32
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    decoded = tok.apply({"params": params}, ids, method="decode_ids")
    rec, _, _ = tok.apply({"params": params}, img)  # the training forward's reconstruction of the same ids
    np.testing.assert_allclose(decoded, rec, atol=2e-5)  # float32, same codes through the same decoder
    assert tuple(tok.last_layer)[-1] == "kernel"
    leaf = params
    for k in tok.last_layer:
        leaf = leaf[k]
    assert leaf.shape[-1] in (3, 3 * 16)  # the decoder's output layer (RGB, or RGB patches for TiTok)


def test_token_layout_refuses_sizes_the_tokenizer_cannot_take():
    vae, vq, titok, _ = (t for t, _ in _tokenizers())
    with pytest.raises(ValueError, match=r"data\.image_size=10 does not fit"):
        vae.token_layout(10)
    with pytest.raises(ValueError, match="not a multiple of the VQ's downsampling 2"):
        vq.token_layout(9)
    assert vq.token_layout(12).grid == (6, 6) and vae.token_layout(8).scale_sides == (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"titok\.image_size=8"):
        titok.token_layout(16)


# ---- the attention mask is a config field ------------------------------------------------------------------------


def test_masks_by_name():
    sides = (1, 2, 3)
    causal, sc, bd, full = (attention_mask(k, 14, sides) for k in ("causal", "scale_causal", "scale_block_diagonal",
                                                                    "full"))  # fmt: skip
    np.testing.assert_array_equal(causal, np.tril(np.ones((14, 14), bool)))
    assert full.all() and sc[5, :5].all() and not sc[0, 1:].any()
    assert bd[3, 1:5].all() and not bd[3, 0] and not bd[3, 5:].any() and (bd <= sc).all()  # token 3: scale 1
    with pytest.raises(ValueError, match="needs a multi-scale token layout"):
        attention_mask("scale_causal", 14)
    with pytest.raises(ValueError, match="use one of"):
        attention_mask("sliding", 14)
    with pytest.raises(ValueError, match=r"NextScaleConfig\.attn_mask='causal'"):
        NextScaleConfig(attn_mask="causal")
    with pytest.raises(ValueError, match=r"NextTokenConfig\.attn_mask='scale_causal'"):
        NextTokenConfig(attn_mask="scale_causal")


def test_markov_var_is_the_same_module_with_another_mask():
    """scale_block_diagonal: the same params give logits that differ from VAR's except at scale 0 (which sees only
    itself under both masks), and each scale's logits depend on that scale's input only. Sampling runs every scale
    in its own forward pass (no KV cache) and reproduces the teacher-forced logits of the tokens it drew."""
    vae, var, vae_p, var_p = tiny_var()
    _, markov, _, _ = tiny_var(attn_mask="scale_block_diagonal")
    labels = jnp.array([3, 10])
    rng = np.random.default_rng(0)
    idx = [jnp.asarray(rng.integers(0, 32, (2, p * p)), jnp.int32) for p in var.config.patch_nums]
    x = vae.apply({"params": vae_p}, idx, method=MultiScaleVQVAE.teacher_forcing_input)
    full, local = var.apply({"params": var_p}, labels, x), markov.apply({"params": var_p}, labels, x)
    np.testing.assert_allclose(local[:, :1], full[:, :1], atol=1e-5)
    assert float(jnp.max(jnp.abs(local[:, 1:] - full[:, 1:]))) > 1e-2
    x2 = x.at[:, :4].set(0.0)  # change scales 1 (tokens 1..4 of the sequence): scales 2, 3 must not move
    local2 = markov.apply({"params": var_p}, labels, x2)
    np.testing.assert_allclose(local2[:, 5:], local[:, 5:], atol=1e-6)
    assert float(jnp.max(jnp.abs(local2[:, 1:5] - local[:, 1:5]))) > 1e-3

    sampler = NextScaleSampler(markov, vae, NextScaleSampling(cfg=1.0, top_k=4, top_p=0.0, return_logits=True))
    out = sampler(var_p, vae_p, jnp.array([3, 7]), jax.random.key(2))
    labels2 = with_null_class(jnp.array([3, 7]), 10)
    idx2 = [jnp.concatenate([i, i]) for i in out.indices]
    x_s = vae.apply({"params": vae_p}, idx2, method=MultiScaleVQVAE.teacher_forcing_input)
    tf = markov.apply({"params": var_p}, labels2, x_s)
    np.testing.assert_allclose(jnp.concatenate(out.head_logits, axis=1), tf, atol=2e-5)


def test_bidirectional_gpt_is_the_same_module_and_is_not_sampled_token_by_token():
    vq, causal = build_llamagen(dict(codebook_size=16, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2),
                                     num_res_blocks=1),
                                dict(num_classes=10, dim=32, n_layer=1, n_head=2, block_size=16))  # fmt: skip
    full = NextTokenTransformer(NextTokenConfig(**{**causal.config.__dict__, "attn_mask": "full"}))
    labels, tokens = jnp.array([1, 2]), jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 15)), jnp.int32)
    params = random_params(jax.eval_shape(causal.init, jax.random.key(0), labels, tokens)["params"])
    a, b = causal.apply({"params": params}, labels, tokens), full.apply({"params": params}, labels, tokens)
    np.testing.assert_allclose(a[:, -1], b[:, -1], atol=1e-5)  # the last position sees everything under both
    assert float(jnp.max(jnp.abs(a[:, 0] - b[:, 0]))) > 1e-3  # the first sees only the class token when causal
    with pytest.raises(ValueError, match="needs a causal GPT"):
        NextTokenSampler(full, vq)


def test_example_image_is_the_size_the_pair_generates():
    fam = FAMILIES["llamagen"]
    vq, gpt = fam.build(dict(codebook_size=16, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 2),
                             num_res_blocks=1), dict(dim=32, n_layer=1, n_head=2, block_size=36))  # fmt: skip
    assert example_image(fam, vq, gpt).shape == (1, 12, 12, 3)  # 6 x 6 tokens at 2x downsampling
    fam.check(vq, gpt, 12)
    with pytest.raises(ValueError, match=r"gives 16 tokens per image but gpt\.block_size=36"):
        fam.check(vq, gpt, 8)


# ---- shared decode pieces ----------------------------------------------------------------------------------------


def test_guidance_forms():
    cond, uncond = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 0.5]])
    np.testing.assert_allclose(guide(cond, uncond, 0.0), cond)
    np.testing.assert_allclose(guide_from_uncond(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(guide(cond, uncond, 1.5), guide_from_uncond(cond, uncond, 2.5), atol=1e-6)
    c, u = split_guided(jnp.concatenate([cond, uncond]))
    np.testing.assert_array_equal(c, cond) and np.testing.assert_array_equal(u, uncond)
    np.testing.assert_array_equal(with_null_class(jnp.array([4, 2]), 9), [4, 2, 9, 9])


def test_mask_by_confidence_masks_the_least_confident():
    rng = np.random.default_rng(0)
    probs = jnp.asarray(rng.uniform(0.01, 1.0, (3, 20)), jnp.float32)
    n = jnp.array([[0], [5], [19]])
    masked = mask_by_confidence(jax.random.key(0), probs, n, temperature=0.0)
    np.testing.assert_array_equal(masked.sum(-1), [0, 5, 19])
    for row, k in zip(range(3), (0, 5, 19), strict=True):  # temperature 0: exactly the k least likely
        want = np.zeros(20, bool)
        want[np.argsort(np.asarray(probs[row]))[:k]] = True
        np.testing.assert_array_equal(masked[row], want)
    fixed = probs.at[:, :10].set(jnp.inf)  # fixed tokens (p = inf) are never masked again
    masked = mask_by_confidence(jax.random.key(1), fixed, jnp.full((3, 1), 10), temperature=4.5)
    assert not bool(masked[:, :10].any()) and bool(masked[:, 10:].all())
    noisy = [mask_by_confidence(jax.random.key(s), probs, jnp.full((3, 1), 5), 50.0) for s in range(2)]
    assert not np.array_equal(noisy[0], noisy[1])  # a high temperature masks nearly at random
