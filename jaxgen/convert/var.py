"""Official VAR checkpoints (FoundationVision/VAR) -> jaxgen params.

Two state_dicts: the multi-scale VQVAE (`vae_ch160v4096z32.pth`) and the transformer (`var_d16.pth`, ...).
Buffers with no jaxgen parameter are accounted for and checked: `quantize.ema_vocab_hit_SV` (a training statistic),
`lvl_1L` and `attn_bias_for_masking` (rebuilt from patch_nums; must agree with the config), per-block
`attn.zero_k_bias` (must be zeros).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import ConversionError, KeyMap, apply_plan, plan_conversion
from jaxgen.models.generators.next_scale import NextScaleConfig, NextScaleTransformer, level_ids
from jaxgen.models.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE

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
    return plan_conversion(shapes, var_param_shapes(config), VAR_KEYMAP, "VAR state_dict", _var_hint(shapes, config))


def plan_vqvae(shapes: Mapping[str, tuple], config: MSVQConfig):
    """Check a VQVAE state_dict's keys and shapes against `config` (shapes only); return the plan."""
    return plan_conversion(shapes, vqvae_param_shapes(config), VQVAE_KEYMAP, "VQVAE state_dict")


def convert_var(state_dict: Mapping[str, np.ndarray], config: NextScaleConfig) -> dict:
    """VAR state_dict (numpy, PyTorch names) -> jaxgen `params` of `NextScaleTransformer(config)`."""
    steps = plan_var({k: v.shape for k, v in state_dict.items()}, config)
    if "lvl_1L" in state_dict and not np.array_equal(
        np.asarray(state_dict["lvl_1L"]).reshape(-1), level_ids(config.patch_nums)
    ):
        counts = np.bincount(np.asarray(state_dict["lvl_1L"]).reshape(-1)).tolist()
        raise ConversionError(
            f"the checkpoint's lvl_1L has {counts} tokens per scale, but config patch_nums "
            f"{config.patch_nums} need {[p * p for p in config.patch_nums]}"
        )
    nonzero = [k for k, v in state_dict.items() if k.endswith("attn.zero_k_bias") and np.any(v)]
    if nonzero:
        raise ConversionError(f"zero_k_bias must be all zeros (VAR's key bias is fixed at 0): {nonzero[:4]}")
    return apply_plan(steps, state_dict)


def convert_vqvae(state_dict: Mapping[str, np.ndarray], config: MSVQConfig) -> dict:
    """VQVAE state_dict (numpy, PyTorch names) -> jaxgen `params` of `MultiScaleVQVAE(config)`."""
    return apply_plan(plan_vqvae({k: v.shape for k, v in state_dict.items()}, config), state_dict)
