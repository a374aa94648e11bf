"""Official VAR checkpoints (FoundationVision/VAR) -> jaxgen params.

Two state_dicts: the multi-scale VQVAE (`vae_ch160v4096z32.pth`) and the transformer (`var_d16.pth`, ...).
Buffers with no jaxgen parameter are accounted for and checked: `quantize.ema_vocab_hit_SV` (a training statistic),
`lvl_1L` and `attn_bias_for_masking` (rebuilt from patch_nums; must agree with the config), per-block
`attn.zero_k_bias` (must be zeros).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import ConversionError, KeyMap, apply_plan, load_state_dict, nchw, plan_conversion
from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer, level_ids
from jaxgen.models.layer_stack import in_layout, unrolled
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from jaxgen.sampling.next_scale import NextScaleSampler, NextScaleSampling

VQVAE_KEYMAP = KeyMap(
    renames=(
        (r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", r"quantize.phi.\1."),  # partially shared Phi (default)
        (r"^quantize\.quant_resi\.qresi\.", "quantize.phi.0."),  # one shared Phi
        (r"^quantize\.quant_resi\.(\d+)\.", r"quantize.phi.\1."),  # one Phi per scale
    ),
    ignore=(r"^quantize\.ema_vocab_hit_SV$",),
)
VAR_KEYMAP = KeyMap(
    renames=((r"ada_lin\.1\.", "ada_lin."),),  # nn.Sequential(SiLU, Linear) -> one Dense
    ignore=(r"^lvl_1L$", r"^attn_bias_for_masking$", r"^blocks\.\d+\.attn\.zero_k_bias$"),
)


def vqvae_param_shapes(config: MSVQConfig):
    s = config.image_size
    return jax.eval_shape(MultiScaleVQVAE(config).init, jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"]


def var_param_shapes(config: NextScaleConfig):
    x = jnp.zeros((1, config.seq_len - config.first_l, config.z_channels))
    return jax.eval_shape(NextScaleTransformer(config).init, jax.random.key(0), jnp.zeros((1,), jnp.int32), x)["params"]


# ---- config inference (for messages and for configs-from-checkpoint) --------------------------------------------
def _num_blocks(shapes: Mapping[str, tuple], pattern: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def infer_var_config(shapes: Mapping[str, tuple], **overrides) -> NextScaleConfig:
    """Read depth, width, heads, classes, vocab and (from the `lvl_1L` buffer) patch_nums off a VAR state_dict."""
    try:
        width, cvae = shapes["word_embed.weight"]
        kw = dict(
            depth=_num_blocks(shapes, r"blocks\.(\d+)\."),
            embed_dim=int(width),
            z_channels=int(cvae),
            num_classes=int(shapes["class_emb.weight"][0]) - 1,
            vocab_size=int(shapes["head.weight"][0]),
            shared_aln="shared_ada_lin.1.weight" in shapes,
            attn_l2_norm="blocks.0.attn.scale_mul_1H11" in shapes,
            mlp_ratio=int(shapes["blocks.0.ffn.fc1.weight"][0]) / int(width),
        )
        if kw["attn_l2_norm"]:
            kw["num_heads"] = int(shapes["blocks.0.attn.scale_mul_1H11"][1])
    except KeyError as e:
        raise ConversionError(f"not a VAR transformer state_dict: key {e} is missing") from e
    kw.update(overrides)
    return NextScaleConfig(**kw)


def patch_nums_from_levels(lvl_1l: np.ndarray) -> tuple[int, ...]:
    """The `lvl_1L` buffer (scale id per token) -> patch_nums."""
    counts = np.bincount(np.asarray(lvl_1l).reshape(-1))
    pn = [round(c**0.5) for c in counts]
    if any(p * p != c for p, c in zip(pn, counts, strict=True)):
        raise ConversionError(f"lvl_1L has per-scale counts {counts.tolist()}, which are not squares")
    return tuple(pn)


def infer_vqvae_config(shapes: Mapping[str, tuple], patch_nums, **overrides) -> MSVQConfig:
    """Read ch, ch_mult, res blocks, z_channels, vocab, Phi sharing off a VQVAE state_dict."""
    try:
        ch = int(shapes["encoder.conv_in.weight"][0])
        levels = _num_blocks(shapes, r"encoder\.down\.(\d+)\.")
        ch_mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // ch for i in range(levels))
        vocab, z = (int(d) for d in shapes["quantize.embedding.weight"])
    except KeyError as e:
        raise ConversionError(f"not a VAR VQVAE state_dict: key {e} is missing") from e
    n_phi = _num_blocks(shapes, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    share = n_phi if n_phi else (1 if "quantize.quant_resi.qresi.weight" in shapes else 0)
    kw = dict(
        vocab_size=vocab,
        z_channels=z,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_num_blocks(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        quant_conv_ks=int(shapes["quant_conv.weight"][-1]),
        share_quant_resi=share,
        patch_nums=tuple(patch_nums),
    )
    if share == 0:
        kw["default_qresi_counts"] = _num_blocks(shapes, r"quantize\.quant_resi\.(\d+)\.")
    kw.update(overrides)
    return MSVQConfig(**kw)


# ---- conversion ---------------------------------------------------------------------------------------------------
def _var_hint(shapes, config: NextScaleConfig) -> str:
    depth = _num_blocks(shapes, r"blocks\.(\d+)\.")
    width = shapes.get("word_embed.weight", (None,))[0]
    if depth and (depth != config.depth or width != config.embed_dim):
        return (
            f"the checkpoint is a VAR-d{depth} (width {width}) but the config is depth {config.depth} "
            f"(width {config.embed_dim}): use configs/var_imagenet.py:d{depth} or the matching checkpoint"
        )
    return ""


def plan_var(shapes: Mapping[str, tuple], config: NextScaleConfig):
    """Check a VAR state_dict's keys and shapes against `config` (shapes only); return the plan."""
    want = var_param_shapes(unrolled(config))  # checkpoints hold the unrolled layout
    return plan_conversion(shapes, want, VAR_KEYMAP, "VAR state_dict", _var_hint(shapes, config))


def plan_vqvae(shapes: Mapping[str, tuple], config: MSVQConfig):
    """Check a VQVAE state_dict's keys and shapes against `config` (shapes only); return the plan."""
    return plan_conversion(shapes, vqvae_param_shapes(config), VQVAE_KEYMAP, "VQVAE state_dict")


def convert_var(state_dict: Mapping[str, np.ndarray], config: NextScaleConfig) -> dict:
    """VAR state_dict (numpy, PyTorch names) -> jaxgen `params` of `NextScaleTransformer(config)`."""
    steps = plan_var({k: v.shape for k, v in state_dict.items()}, config)
    check_scale_buffers(state_dict, config)
    return in_layout(apply_plan(steps, state_dict), config, var_param_shapes)


def check_scale_buffers(state_dict: Mapping[str, np.ndarray], config: NextScaleConfig) -> None:
    """The buffers every next-scale transformer (VAR, HMAR) carries must be the constants `config` rebuilds:
    `lvl_1L` (the scale of each token) and all-zero `*.attn.zero_k_bias`."""
    if "lvl_1L" in state_dict:
        lvl = np.asarray(state_dict["lvl_1L"]).reshape(-1)
        if not np.array_equal(lvl, level_ids(config.patch_nums)):
            counts = np.bincount(lvl).tolist() if lvl.size and lvl.min() >= 0 else lvl.tolist()[:8]
            raise ConversionError(
                f"the checkpoint's lvl_1L has {counts} tokens per scale, but config patch_nums "
                f"{config.patch_nums} need {[p * p for p in config.patch_nums]}"
            )
    nonzero = [k for k, v in state_dict.items() if k.endswith("attn.zero_k_bias") and np.any(v)]
    if nonzero:
        raise ConversionError(f"zero_k_bias must be all zeros (VAR's key bias is fixed at 0): {nonzero[:4]}")


def convert_vqvae(state_dict: Mapping[str, np.ndarray], config: MSVQConfig) -> dict:
    """VQVAE state_dict (numpy, PyTorch names) -> jaxgen `params` of `MultiScaleVQVAE(config)`."""
    return apply_plan(plan_vqvae({k: v.shape for k, v in state_dict.items()}, config), state_dict)


# ---- the golden check (`python -m jaxgen.convert.verify --family var`) ---------------------------------------
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


def run_vqvae_outputs(vae: MultiScaleVQVAE, vae_p: dict, img) -> tuple[dict[str, np.ndarray], list]:
    """The VQVAE tensors of a VAR-family fixture (encode, quantize, rebuild) by their `out/` names, and the per-scale
    ids `[B, p^2]`."""
    out: dict[str, np.ndarray] = {}
    out["vae_enc"] = nchw(vae.apply(vae_p, img, method=lambda m, x: m.encoder(x)))
    f = vae.apply(vae_p, img, method=MultiScaleVQVAE.encode)
    out["vae_f"] = nchw(f)
    idx, f_hats = vae.apply(vae_p, f, method=lambda m, x: m.quantize.quantize(x))
    for k, i in enumerate(idx):
        out[f"vae_idx_s{k}"] = np.asarray(i, np.int64)
    out["vae_fhat_cum"] = np.stack([nchw(fh) for fh in f_hats])
    f_hat = vae.apply(vae_p, idx, method=lambda m, i: m.quantize.indices_to_fhat(i))
    out["vae_fhat"] = nchw(f_hat)
    out["vae_dec_raw"] = nchw(vae.apply(vae_p, f_hat, method=MultiScaleVQVAE.fhat_to_img))
    out["vae_rec"] = nchw(vae.apply(vae_p, idx, method=MultiScaleVQVAE.indices_to_img))
    return out, idx


def run_var_fixture(npz_path: Path, meta: dict, scan_layers: bool = False) -> dict[str, np.ndarray]:
    """All of a VAR fixture's `out/` tensors, computed by jaxgen from its `in/` tensors (PyTorch layouts); with
    `scan_layers` by the scanned transformer (the converted params stacked)."""
    vae_cfg, var_cfg = var_configs_from_fixture(meta)
    var_cfg = dataclasses.replace(var_cfg, scan_layers=scan_layers)
    vae, var = MultiScaleVQVAE(vae_cfg), NextScaleTransformer(var_cfg)
    vae_p = {"params": convert_vqvae(load_state_dict(npz_path, "vae/"), vae_cfg)}
    var_p = {"params": convert_var(load_state_dict(npz_path, "var/"), var_cfg)}
    inputs = load_state_dict(npz_path, "in/")
    img = jnp.asarray(np.transpose(inputs["img"], (0, 2, 3, 1)))
    labels = jnp.asarray(inputs["labels"], jnp.int32)
    gen_labels = jnp.asarray(inputs["gen_labels"], jnp.int32)
    out, idx = run_vqvae_outputs(vae, vae_p, img)

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
    out["infer_fhat"] = nchw(sample.f_hat)
    out["infer_dec_raw"] = nchw(sample.decoded)
    out["infer_img"] = nchw(sample.images)

    # Teacher forcing on the sampled tokens, batch [cond; null].
    labels2 = jnp.concatenate([gen_labels, jnp.full_like(gen_labels, var_cfg.num_classes)])
    idx2 = [jnp.concatenate([i, i]) for i in sample.indices]
    out["tf_sampled_labels2"] = np.asarray(labels2, np.int64)
    x2 = vae.apply(vae_p, idx2, method=MultiScaleVQVAE.teacher_forcing_input)
    out["tf_sampled_logits"] = np.asarray(var.apply(var_p, labels2, x2))
    return out
