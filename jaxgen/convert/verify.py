"""Golden check: convert a reference fixture's weights, run its inputs through jaxgen, compare with its outputs.

    python -m jaxgen.convert.verify --family var FIXTURE.npz [--dump OUT.npz]

The model config comes from the `.json` beside the npz. Prints a JSON report (per output key: max abs diff, or exact
match for integer outputs) and exits 0 only if every integer output matches exactly and every float output is within
`--atol` * max(1, |reference|).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import load_state_dict
from jaxgen.convert.llamagen import convert_gpt, convert_vq
from jaxgen.convert.var import convert_var, convert_vqvae
from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer, next_token_loss
from jaxgen.models.layers import rope_2d_table
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling

_VAE_CTOR_FIELDS = (
    "vocab_size",
    "z_channels",
    "ch",
    "quant_conv_ks",
    "quant_resi",
    "share_quant_resi",
    "default_qresi_counts",
    "using_znorm",
    "beta",
)
_VAR_CTOR_FIELDS = (
    "num_classes",
    "depth",
    "embed_dim",
    "num_heads",
    "mlp_ratio",
    "norm_eps",
    "shared_aln",
    "attn_l2_norm",
    "patch_nums",
    "cond_drop_rate",
    "drop_path_rate",
)


def var_configs_from_fixture(meta: dict) -> tuple[MSVQConfig, NextScaleConfig]:
    """Build both configs from a VAR fixture's JSON (constructor arguments of the official classes)."""
    vae_ctor, var_ctor, top = meta["vae_ctor"], meta["var_ctor"], meta.get("config", {})
    vae_kw = {k: vae_ctor[k] for k in _VAE_CTOR_FIELDS if k in vae_ctor}
    vae_kw["patch_nums"] = tuple(vae_ctor.get("v_patch_nums") or top["patch_nums"])
    for k in ("ch_mult", "num_res_blocks"):  # fixed in the official VQVAE class; the fixture JSON records them
        if k in top:
            vae_kw[k] = tuple(top[k]) if k == "ch_mult" else top[k]
    vae_cfg = MSVQConfig(**vae_kw)
    var_kw = {k: var_ctor[k] for k in _VAR_CTOR_FIELDS if k in var_ctor}
    var_kw.update(vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels)
    return vae_cfg, NextScaleConfig(**var_kw)


def _nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def run_var_fixture(npz_path: Path, meta: dict) -> dict[str, np.ndarray]:
    """All of a VAR fixture's `out/` tensors, computed by jaxgen from its `in/` tensors (PyTorch layouts)."""
    vae_cfg, var_cfg = var_configs_from_fixture(meta)
    vae, var = MultiScaleVQVAE(vae_cfg), NextScaleTransformer(var_cfg)
    vae_p = {"params": convert_vqvae(load_state_dict(npz_path, "vae/"), vae_cfg)}
    var_p = {"params": convert_var(load_state_dict(npz_path, "var/"), var_cfg)}
    inputs = load_state_dict(npz_path, "in/")
    img = jnp.asarray(np.transpose(inputs["img"], (0, 2, 3, 1)))
    labels = jnp.asarray(inputs["labels"], jnp.int32)
    gen_labels = jnp.asarray(inputs["gen_labels"], jnp.int32)
    out: dict[str, np.ndarray] = {}

    # Tokenizer: encode, quantize, rebuild.
    out["vae_enc"] = _nchw(vae.apply(vae_p, img, method=lambda m, x: m.encoder(x)))
    f = vae.apply(vae_p, img, method=MultiScaleVQVAE.encode)
    out["vae_f"] = _nchw(f)
    idx, f_hats = vae.apply(vae_p, f, method=lambda m, x: m.quantize.quantize(x))
    for k, i in enumerate(idx):
        out[f"vae_idx_s{k}"] = np.asarray(i, np.int64)
    out["vae_fhat_cum"] = np.stack([_nchw(fh) for fh in f_hats])
    f_hat = vae.apply(vae_p, idx, method=lambda m, i: m.quantize.indices_to_fhat(i))
    out["vae_fhat"] = _nchw(f_hat)
    out["vae_dec_raw"] = _nchw(vae.apply(vae_p, f_hat, method=MultiScaleVQVAE.fhat_to_img))
    out["vae_rec"] = _nchw(vae.apply(vae_p, idx, method=MultiScaleVQVAE.indices_to_img))

    # Transformer, teacher forcing.
    x_tf = vae.apply(vae_p, idx, method=MultiScaleVQVAE.teacher_forcing_input)
    out["var_input"] = np.asarray(x_tf)
    out["var_logits"] = np.asarray(var.apply(var_p, labels, x_tf))

    # Sampling.
    s = meta["sampling"]
    settings = NextScaleSampling(
        cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"], more_smooth=s["more_smooth"], return_logits=True
    )
    sample = NextScaleSampler(var, vae, settings)(
        var_p["params"], vae_p["params"], gen_labels, jax.random.key(s.get("g_seed") or 0)
    )
    for k, (i, lg) in enumerate(zip(sample.indices, sample.head_logits, strict=True)):
        out[f"infer_idx_s{k}"] = np.asarray(i, np.int64)
        out[f"infer_head_logits_s{k}"] = np.asarray(lg)
    out["infer_fhat"] = _nchw(sample.f_hat)
    out["infer_dec_raw"] = _nchw(sample.decoded)
    out["infer_img"] = _nchw(sample.images)

    # Teacher forcing on the sampled tokens, batch [cond; null].
    labels2 = jnp.concatenate([gen_labels, jnp.full_like(gen_labels, var_cfg.num_classes)])
    idx2 = [jnp.concatenate([i, i]) for i in sample.indices]
    out["tf_sampled_labels2"] = np.asarray(labels2, np.int64)
    x2 = vae.apply(vae_p, idx2, method=MultiScaleVQVAE.teacher_forcing_input)
    out["tf_sampled_logits"] = np.asarray(var.apply(var_p, labels2, x2))
    return out


def llamagen_configs_from_fixture(meta: dict) -> tuple[VQConfig, NextTokenConfig]:
    """Build both configs from a LlamaGen fixture's JSON (upstream ModelArgs plus the constructor extras)."""
    vq_args, extra, gpt_args = meta["vq_model_args"], meta.get("vq_extra", {}), meta["gpt_model_args"]
    vq_cfg = VQConfig(
        codebook_size=vq_args["codebook_size"], codebook_embed_dim=vq_args["codebook_embed_dim"],
        z_channels=vq_args["z_channels"], ch=extra.get("ch", 128), ch_mult=tuple(vq_args["encoder_ch_mult"]),
        decoder_ch_mult=tuple(vq_args["decoder_ch_mult"]), num_res_blocks=extra.get("num_res_blocks", 2),
        l2_norm=vq_args.get("codebook_l2_norm", True), beta=vq_args.get("commit_loss_beta", 0.25),
    )  # fmt: skip
    fields = {f.name for f in dataclasses.fields(NextTokenConfig)}
    gpt_cfg = NextTokenConfig(**{k: v for k, v in gpt_args.items() if k in fields})
    return vq_cfg, gpt_cfg


def run_llamagen_fixture(npz_path: Path, meta: dict) -> dict[str, np.ndarray]:
    """All of a LlamaGen fixture's `out/` tensors, computed by jaxgen from its `in/` tensors (PyTorch layouts)."""
    vq_cfg, gpt_cfg = llamagen_configs_from_fixture(meta)
    vq, gpt = VQGAN(vq_cfg), NextTokenTransformer(gpt_cfg)
    vq_params = convert_vq(load_state_dict(npz_path, "vq/"), vq_cfg)
    gpt_params = convert_gpt(load_state_dict(npz_path, "gpt/"), gpt_cfg)
    vq_p, gpt_p = {"params": vq_params}, {"params": gpt_params}
    inputs = load_state_dict(npz_path, "in/")
    img = jnp.asarray(np.transpose(inputs["images"], (0, 2, 3, 1)))
    out: dict[str, np.ndarray] = {}

    out["vq_encoder_out"] = _nchw(vq.apply(vq_p, img, method=lambda m, x: m.encoder(x)))
    out["vq_pre_quant"] = _nchw(vq.apply(vq_p, img, method=VQGAN.pre_quant))
    quant, idx = vq.apply(vq_p, img, method=VQGAN.encode)
    out["vq_quant"] = _nchw(quant)
    out["vq_indices"] = np.asarray(idx, np.int64)
    out["vq_recon"] = _nchw(vq.apply(vq_p, quant, method=VQGAN.decode))
    out["vq_recon_from_codes"] = _nchw(vq.apply(vq_p, idx, tuple(quant.shape[1:3]), method=VQGAN.decode_code))

    tokens = jnp.asarray(inputs["gpt_tokens"], jnp.int32)
    logits = gpt.apply(gpt_p, jnp.asarray(inputs["gpt_labels"], jnp.int32), tokens[:, :-1])
    out["gpt_logits"] = np.asarray(logits)
    out["gpt_loss"] = np.asarray(next_token_loss(logits, tokens))

    s = meta["sampling"]
    gen_labels = jnp.asarray(inputs["gen_labels"], jnp.int32)
    for name, cfg_scale in (("cfg", s["cfg_scale"]), ("nocfg", 1.0)):
        settings = NextTokenSampling(
            cfg_scale=cfg_scale,
            cfg_interval=s.get("cfg_interval", -1),
            temperature=s.get("temperature", 1.0),
            top_k=s.get("top_k", 0),
            top_p=s.get("top_p", 1.0),
            return_logits=True,
        )
        sample = NextTokenSampler(gpt, vq, settings)(gpt_params, vq_params, gen_labels, jax.random.key(0))
        out[f"gen_{name}_indices"] = np.asarray(sample.tokens, np.int32)
        out[f"gen_{name}_step_logits"] = np.asarray(sample.step_logits)
        out[f"gen_{name}_images"] = _nchw(sample.decoded)
    out["gpt_freqs_cis"] = rope_2d_table(gpt_cfg.grid_size, gpt_cfg.head_dim, gpt_cfg.rope_base, gpt_cfg.cls_token_num)
    return out


FAMILIES: dict[str, Callable[[Path, dict], dict[str, np.ndarray]]] = {
    "var": run_var_fixture,
    "llamagen": run_llamagen_fixture,
}


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], atol: float) -> tuple[bool, dict]:
    """Per-key report; integers must match exactly, floats within atol * max(1, |ref|)."""
    report, ok = {}, True
    for name, ref in reference.items():
        if name not in ours:
            report[name] = {"ok": False, "error": "not produced"}
            ok = False
            continue
        got = np.asarray(ours[name])
        if got.shape != ref.shape:
            report[name] = {"ok": False, "error": f"shape {list(got.shape)} != reference {list(ref.shape)}"}
            ok = False
        elif np.issubdtype(ref.dtype, np.integer):
            mismatches = int(np.sum(got != ref))
            report[name] = {"ok": mismatches == 0, "exact_match": mismatches == 0, "mismatches": mismatches}
        else:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            worst = float(np.max(diff / np.maximum(1.0, np.abs(ref)))) if diff.size else 0.0
            report[name] = {
                "ok": worst <= atol,
                "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                "max_scaled_diff": worst,
            }
        ok &= report[name]["ok"]
    return ok, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgen.convert.verify", description=__doc__.split("\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture .npz (its .json must sit beside it)")
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--dump", type=Path, help="write jaxgen's outputs here as out/<name> (same shapes)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    meta_path = args.fixture.with_suffix(".json")
    if not args.fixture.is_file() or not meta_path.is_file():
        parser.error(f"need both {args.fixture} and {meta_path}")
    jax.config.update("jax_default_matmul_precision", "highest")
    meta = json.loads(meta_path.read_text())
    ours = FAMILIES[args.family](args.fixture, meta)
    reference = load_state_dict(args.fixture, "out/")
    ok, report = compare(ours, reference, args.atol)
    if args.dump:
        dtypes = {k: v.dtype for k, v in reference.items()}
        np.savez(args.dump, **{f"out/{k}": np.asarray(v, dtypes.get(k, v.dtype)) for k, v in ours.items()})
    print(
        json.dumps(
            {"fixture": str(args.fixture), "family": args.family, "ok": ok, "atol": args.atol, "outputs": report},
            indent=1,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
