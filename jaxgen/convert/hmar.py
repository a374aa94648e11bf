"""Official HMAR checkpoints (NVlabs/HMAR) -> jaxgen params.

Two state_dicts, as for VAR: the multi-scale VQVAE (VAR's `vae_ch160v4096z32.pth`, converted by
`jaxgen.convert.var.convert_vqvae`) and the HMAR transformer (`hmar-d16.pth`, ...), in the released inference layout
of upstream's `HMAR` class:

    base_blocks.i, ns_blocks.j, mask_blocks.j    -> base_blocks_i, ns_blocks_j, mask_blocks_j
    ns_head_nm.ada_lin.1 / ns_head, mask_head*   -> ns_head_nm/ada_lin, ns_head, mask_head_nm/ada_lin, mask_head
    word_embed.weight (no bias), word_embed_bias -> word_embed/kernel, word_embed_bias
    mask_embed.weight, class_emb, pos_start (1, first_l, C), pos_1LC (1, L, C), lvl_embed

Buffers with no jaxgen parameter are accounted for and checked: `lvl_1L` (must agree with patch_nums),
`attn_bias_for_masking` (must be HMAR's block-diagonal mask: 0 within a scale, -inf across scales; VAR's block-causal
one means the file is a VAR model) and every `*.attn.zero_k_bias` (must be zeros).

Upstream's training classes keep VAR's layout (`blocks.i`, `head_nm`, `head`): the stage-1 `NextScalePrediction`
(`word_embed.weight` + `word_embed.bias`) and the stage-2 `MaskedPrediction` (bias-free `word_embed`,
`word_embed_bias`, `mask_embed`). `hmar_from_training_dicts` assembles the released layout from the two, as
upstream's `HMAR.load_base_and_ns_state_dict` + `load_mask_dict` do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import ConversionError, KeyMap, apply_plan, load_state_dict, plan_conversion
from jaxgen.convert.var import (
    _num_blocks,
    check_scale_buffers,
    convert_vqvae,
    infer_vqvae_config,
    patch_nums_from_levels,
    var_configs_from_fixture,
)
from jaxgen.models.generators.hmar import HMARConfig, HMARTransformer
from jaxgen.models.generators.next_scale import level_ids
from jaxgen.models.layer_stack import in_layout, unrolled
from jaxgen.models.tokenizers.msvq import MSVQConfig

HMAR_KEYMAP = KeyMap(
    renames=((r"ada_lin\.1\.", "ada_lin."),),  # nn.Sequential(SiLU, Linear) -> one Dense (also shared_ada_lin.1.)
    ignore=(r"^lvl_1L$", r"^attn_bias_for_masking$", r"^(base|ns|mask)_blocks\.\d+\.attn\.zero_k_bias$"),
)
# the magnitude below which an off-scale entry of attn_bias_for_masking counts as "masked" (upstream: -inf)
_MASKED = -1e4
_TRAINING_MAP_HELP = "jaxgen.convert.hmar.hmar_from_training_dicts (CLI: --nsp STAGE1 --mp STAGE2)"


def hmar_param_shapes(config: HMARConfig):
    """The jaxgen param tree of `HMARTransformer(config)` as shapes (nothing allocated)."""
    x = jnp.zeros((1, config.seq_len - config.first_l, config.z_channels))
    return jax.eval_shape(HMARTransformer(config).init, jax.random.key(0), jnp.zeros((1,), jnp.int32), x)["params"]


def _shapes(sd_or_shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """A state_dict (arrays) or a name -> shape mapping -> name -> shape."""
    return {k: tuple(int(d) for d in (v.shape if hasattr(v, "shape") else v)) for k, v in sd_or_shapes.items()}


# ---- layouts --------------------------------------------------------------------------------------------------------
def _is_training_layout(shapes: Mapping[str, tuple]) -> bool:
    """VAR's layout (`blocks.i`, `head`): a VAR model or one of HMAR's training classes, not the released HMAR."""
    has_var = any(k.startswith("blocks.") for k in shapes) or "head.weight" in shapes
    has_hmar = any(re.match(r"(base|ns|mask)_blocks\.", k) for k in shapes) or "ns_head.weight" in shapes
    return has_var and not has_hmar


def _mask_kind(bias: np.ndarray, patch_nums) -> str:
    """Which mask an `attn_bias_for_masking` buffer is: 'block_diagonal' (HMAR), 'block_causal' (VAR) or 'other'."""
    bias = np.asarray(bias, np.float64)
    lvl = level_ids(patch_nums)
    if bias.shape[-2:] != (lvl.size, lvl.size):
        return "other"
    bias = bias.reshape(lvl.size, lvl.size)
    for kind, visible in (
        ("block_diagonal", lvl[:, None] == lvl[None, :]),
        ("block_causal", lvl[None, :] <= lvl[:, None]),  # row = query, column = key
    ):
        if np.all(bias[visible] == 0) and np.all(bias[~visible] <= _MASKED):
            return kind
    return "other"


def _training_layout_error(sd_or_shapes: Mapping) -> ConversionError:
    """The one-line error for a VAR-layout transformer given as an HMAR (released-layout) state_dict."""
    what = "a VAR transformer"
    bias, lvl = sd_or_shapes.get("attn_bias_for_masking"), sd_or_shapes.get("lvl_1L")
    if isinstance(bias, np.ndarray) and isinstance(lvl, np.ndarray):
        try:
            kind = _mask_kind(bias, patch_nums_from_levels(lvl))
        except ConversionError:
            kind = "other"
        if kind == "block_causal":
            what = "a VAR transformer (its attn_bias_for_masking is VAR's block-causal mask)"
        elif kind == "block_diagonal":
            stage = "stage-2 MaskedPrediction" if "mask_embed.weight" in sd_or_shapes else "stage-1 NextScalePrediction"
            what = f"an HMAR training checkpoint, upstream's {stage} (VAR's key layout, HMAR's block-diagonal mask)"
    return ConversionError(
        f"the HMAR state_dict is {what}: it has VAR's keys (blocks.i, head.weight), not the released HMAR layout "
        f"(base_blocks / ns_blocks / mask_blocks, ns_head, mask_head). A VAR checkpoint converts with "
        f"`python -m jaxgen.convert var`; HMAR's stage-1 + stage-2 training checkpoints map onto the released layout "
        f"with {_TRAINING_MAP_HELP}"
    )


# ---- config inference -----------------------------------------------------------------------------------------------
def infer_hmar_config(shapes: Mapping, **overrides) -> HMARConfig:
    """Read depth (base + ns blocks), mask_layers (ns blocks = mask blocks), width, heads, classes, vocab, z_channels,
    shared_aln, l2-norm attention and mlp_ratio off an HMAR state_dict (or its name -> shape mapping); patch_nums
    from its `lvl_1L` buffer when `shapes` holds that array (else from `overrides`, else HMARConfig's default)."""
    sd = shapes
    shapes = _shapes(sd)
    if _is_training_layout(shapes):
        raise _training_layout_error(sd)
    n_base = _num_blocks(shapes, r"base_blocks\.(\d+)\.")
    n_ns = _num_blocks(shapes, r"ns_blocks\.(\d+)\.")
    n_mask = _num_blocks(shapes, r"mask_blocks\.(\d+)\.")
    if n_ns != n_mask:
        raise ConversionError(
            f"the HMAR state_dict has {n_ns} ns_blocks but {n_mask} mask_blocks: both branches must have "
            f"n_layers_train blocks on top of the {n_base} shared base_blocks"
        )
    if n_ns == 0:
        raise ConversionError("not an HMAR state_dict: it has no ns_blocks / mask_blocks")
    first = "base_blocks.0" if n_base else "ns_blocks.0"
    try:
        width, cvae = shapes["word_embed.weight"]
        kw = dict(
            depth=n_base + n_ns,
            mask_layers=n_ns,
            embed_dim=int(width),
            z_channels=int(cvae),
            num_classes=int(shapes["class_emb.weight"][0]) - 1,
            vocab_size=int(shapes["ns_head.weight"][0]),
            shared_aln="shared_ada_lin.1.weight" in shapes,
            attn_l2_norm=f"{first}.attn.scale_mul_1H11" in shapes,
            mlp_ratio=int(shapes[f"{first}.ffn.fc1.weight"][0]) / int(width),
        )
        if kw["attn_l2_norm"]:
            kw["num_heads"] = int(shapes[f"{first}.attn.scale_mul_1H11"][1])
        seq_len = int(np.prod(shapes["pos_1LC"])) // int(width)
    except KeyError as e:
        raise ConversionError(f"not an HMAR state_dict: key {e} is missing") from e
    if isinstance(sd.get("lvl_1L"), np.ndarray):
        kw["patch_nums"] = patch_nums_from_levels(sd["lvl_1L"])
    kw.update(overrides)
    try:
        cfg = HMARConfig(**kw)
    except ValueError as e:
        raise ConversionError(f"the sizes read off the HMAR state_dict make no config: {e}") from e
    if cfg.seq_len != seq_len:
        raise ConversionError(
            f"the HMAR state_dict has {seq_len} positions (pos_1LC) but patch_nums {cfg.patch_nums} make "
            f"{cfg.seq_len}: pass patch_nums= (or a state_dict with its lvl_1L buffer)"
        )
    return cfg


# ---- conversion -----------------------------------------------------------------------------------------------------
def _hmar_hint(shapes: Mapping[str, tuple], config: HMARConfig) -> str:
    n_base = _num_blocks(shapes, r"base_blocks\.(\d+)\.")
    n_ns = _num_blocks(shapes, r"ns_blocks\.(\d+)\.")
    n_mask = _num_blocks(shapes, r"mask_blocks\.(\d+)\.")
    depth = n_base + n_ns
    width = shapes.get("word_embed.weight", (None,))[0]
    if n_ns and (depth != config.depth or width != config.embed_dim or n_ns != config.mask_layers):
        return (
            f"the checkpoint is an HMAR-d{depth} (width {width}; {n_base} base + {n_ns} ns + {n_mask} mask blocks) "
            f"but the config is depth {config.depth} (width {config.embed_dim}; {config.base_layers} base + "
            f"{config.mask_layers} ns + {config.mask_layers} mask blocks): use configs/hmar_imagenet.py:d{depth} "
            f"or the matching checkpoint"
        )
    return ""


def plan_hmar(shapes: Mapping[str, tuple], config: HMARConfig):
    """Check an HMAR state_dict's keys and shapes against `config` (shapes only); return the plan."""
    shapes = _shapes(shapes)
    if _is_training_layout(shapes):
        raise _training_layout_error(shapes)
    return plan_conversion(
        shapes, hmar_param_shapes(unrolled(config)), HMAR_KEYMAP, "HMAR state_dict", _hmar_hint(shapes, config)
    )


def check_hmar_buffers(state_dict: Mapping[str, np.ndarray], config: HMARConfig) -> None:
    """The buffers must be the constants `config` rebuilds: lvl_1L, the block-diagonal mask, zero key biases."""
    check_scale_buffers(state_dict, config)
    if "attn_bias_for_masking" in state_dict:
        kind = _mask_kind(state_dict["attn_bias_for_masking"], config.patch_nums)
        if kind == "block_causal":
            raise ConversionError(
                "attn_bias_for_masking is VAR's block-causal mask (a token sees its own and all coarser scales), "
                "not HMAR's block-diagonal one: this is a VAR checkpoint; convert it with "
                "`python -m jaxgen.convert var`"
            )
        if kind != "block_diagonal":
            raise ConversionError(
                f"attn_bias_for_masking {tuple(np.shape(state_dict['attn_bias_for_masking']))} is not HMAR's "
                f"block-diagonal mask for patch_nums {config.patch_nums} (0 within a scale, -inf across scales)"
            )


def convert_hmar(state_dict: Mapping[str, np.ndarray], config: HMARConfig) -> dict:
    """HMAR state_dict (numpy, PyTorch names, released layout) -> jaxgen `params` of `HMARTransformer(config)`."""
    if _is_training_layout(state_dict):
        raise _training_layout_error(state_dict)
    steps = plan_hmar(_shapes(state_dict), config)
    check_hmar_buffers(state_dict, config)
    return in_layout(apply_plan(steps, state_dict), config, hmar_param_shapes)


def convert_pair(
    vae_sd: Mapping[str, np.ndarray], hmar_sd: Mapping[str, np.ndarray], vae_cfg: MSVQConfig, hmar_cfg: HMARConfig
) -> dict:
    """Both state_dicts -> `{"vae": ..., "hmar": ...}`, after checking that the two models fit together (patch_nums,
    vocabulary, code width)."""
    levels = hmar_sd.get("lvl_1L")
    ckpt_pn = patch_nums_from_levels(levels) if levels is not None else None
    for pn, whose in ((hmar_cfg.patch_nums, "config"), (ckpt_pn, "checkpoint's lvl_1L")):
        if pn is not None and tuple(pn) != tuple(vae_cfg.patch_nums):
            raise ConversionError(
                f"the VQVAE's patch_nums {tuple(vae_cfg.patch_nums)} differ from the HMAR transformer's "
                f"{tuple(pn)} (from its {whose}): both models must use the same scales"
            )
    for field in ("vocab_size", "z_channels"):
        if getattr(vae_cfg, field) != getattr(hmar_cfg, field):
            raise ConversionError(
                f"the VQVAE's {field} {getattr(vae_cfg, field)} differs from the HMAR transformer's "
                f"{getattr(hmar_cfg, field)}: they are not a pair"
            )
    return {"vae": convert_vqvae(vae_sd, vae_cfg), "hmar": convert_hmar(hmar_sd, hmar_cfg)}


# ---- training-class checkpoints (stage 1 NextScalePrediction, stage 2 MaskedPrediction) ---------------------------
def _training_depth(sd: Mapping, what: str) -> int:
    if not _is_training_layout(sd):
        raise ConversionError(
            f"the {what} state_dict does not have the training classes' keys (blocks.i, head_nm, head)"
            + (": it already is the released HMAR layout, convert it with --hmar" if "ns_head.weight" in sd else "")
        )
    return _num_blocks(sd, r"blocks\.(\d+)\.")


def _rename_training_key(key: str, base: int, branch: str) -> str:
    """A training-class key -> the released layout: blocks.i -> base_blocks.i (i < base) or {branch}_blocks.(i-base);
    head* -> {branch}_head*."""
    if m := re.match(r"blocks\.(\d+)\.(.*)$", key):
        i = int(m.group(1))
        return f"base_blocks.{i}.{m.group(2)}" if i < base else f"{branch}_blocks.{i - base}.{m.group(2)}"
    if key.startswith("head"):  # head_nm.ada_lin.1.*, head.*
        return f"{branch}_{key}"
    return key


def hmar_from_training_dicts(
    nsp_sd: Mapping[str, np.ndarray], mp_sd: Mapping[str, np.ndarray], mask_layers: int, check_shared: bool = True
) -> dict[str, np.ndarray]:
    """Upstream's stage-1 (`NextScalePrediction`) and stage-2 (`MaskedPrediction`) state_dicts -> one HMAR
    state_dict in the released layout, as `HMAR.load_base_and_ns_state_dict(nsp)` then `load_mask_dict(mp)` build it.

    From stage 1: every shared tensor, `blocks.i` -> `base_blocks.i` (i < depth - mask_layers) or `ns_blocks`,
    `head*` -> `ns_head*`, `word_embed.bias` -> `word_embed_bias`. From stage 2: its last `mask_layers` blocks ->
    `mask_blocks`, `head*` -> `mask_head*`, `mask_embed`. Stage 2 trains only those, so with `check_shared` every
    tensor it shares with stage 1 (embeddings, word_embed, the first depth - mask_layers blocks) must be equal."""
    depth = _training_depth(nsp_sd, "stage-1 (NextScalePrediction)")
    mp_depth = _training_depth(mp_sd, "stage-2 (MaskedPrediction)")
    if "word_embed.bias" not in nsp_sd:
        raise ConversionError(
            "the stage-1 state_dict has no word_embed.bias: upstream's NextScalePrediction has one "
            + ("(this looks like the stage-2 MaskedPrediction: pass the dicts in the order stage 1, stage 2)"
               if "mask_embed.weight" in nsp_sd else "")
        )  # fmt: skip
    if "mask_embed.weight" not in mp_sd or "word_embed_bias" not in mp_sd:
        raise ConversionError(
            "the stage-2 state_dict lacks mask_embed.weight / word_embed_bias: it is not upstream's MaskedPrediction"
        )
    if mp_depth != depth:
        raise ConversionError(f"the stage-1 model has {depth} blocks but the stage-2 model has {mp_depth}")
    if not 1 <= mask_layers <= depth:
        raise ConversionError(f"mask_layers (n_layers_train) {mask_layers} must be in [1, depth={depth}]")
    base = depth - mask_layers
    out: dict[str, np.ndarray] = {}
    for key, value in nsp_sd.items():
        out["word_embed_bias" if key == "word_embed.bias" else _rename_training_key(key, base, "ns")] = value
    for key, value in mp_sd.items():
        name = _rename_training_key(key, base, "mask")
        if name.startswith(("mask_", "attn_bias_for_masking")):  # upstream load_mask_dict: "head" or "mask" in name
            out[name] = value
        elif check_shared:
            ref = out.get(name)
            if ref is None or np.shape(ref) != np.shape(value) or not np.array_equal(ref, value):
                raise ConversionError(
                    f"stage-2 tensor {key} differs from stage 1's {name}: stage 2 trains only its last {mask_layers} "
                    f"blocks, its head and mask_embed, so the rest must be stage 1's (wrong mask_layers, or dicts of "
                    f"two different runs? check_shared=False takes stage 1's, as upstream does)"
                )
    return out


# ---- the CLI hooks (`python -m jaxgen.convert hmar`, wired in jaxgen/families/hmar.py) ----------------------------
def add_convert_arguments(p) -> None:
    p.add_argument(
        "--vae", required=True, help="VQVAE state_dict (.pth / .npz / .safetensors): VAR's vae_ch160v4096z32"
    )
    p.add_argument("--hmar", default="", help="HMAR state_dict in the released layout (hmar-d16.pth, ...)")
    p.add_argument("--nsp", default="", help="instead of --hmar: upstream's stage-1 NextScalePrediction state_dict")
    p.add_argument("--mp", default="", help="with --nsp: upstream's stage-2 MaskedPrediction state_dict")
    p.add_argument(
        "--mask-layers", type=int, default=0, help="with --nsp/--mp: n_layers_train (default: the config's, else 8)"
    )
    p.add_argument("--config", default="", help="configs/NAME.py:variant (default: read sizes off the files)")


def _load_hmar_state_dict(args, cfg) -> dict[str, np.ndarray]:
    hmar, nsp, mp = getattr(args, "hmar", ""), getattr(args, "nsp", ""), getattr(args, "mp", "")
    if hmar and (nsp or mp):
        raise ConversionError("pass either --hmar (released layout) or --nsp and --mp (training classes), not both")
    if hmar:
        return load_state_dict(hmar)
    if not (nsp and mp):
        raise ConversionError("pass --hmar HMAR.pth (released layout), or --nsp STAGE1.pth with --mp STAGE2.pth")
    mask_layers = getattr(args, "mask_layers", 0) or (int(cfg.hmar.get("mask_layers", 8)) if cfg else 8)
    return hmar_from_training_dicts(load_state_dict(nsp), load_state_dict(mp), mask_layers)


def convert_checkpoints(args) -> tuple[dict, dict]:
    """`args.vae` + `args.hmar` (or `args.nsp` + `args.mp`), optional `args.config` -> (params, config dict)."""
    cfg = None
    if getattr(args, "config", ""):
        from jaxgen.config_util import load_config

        cfg = load_config(args.config)
    vae_sd, hmar_sd = load_state_dict(args.vae), _load_hmar_state_dict(args, cfg)
    if cfg is not None:
        from jaxgen.families.hmar import build

        vae, hmar = build(cfg.vae, cfg.hmar)
        vae_cfg, hmar_cfg = vae.config, hmar.config
    else:
        if "lvl_1L" not in hmar_sd:
            raise ConversionError("the HMAR state_dict has no lvl_1L buffer to read patch_nums from; pass --config")
        hmar_cfg = infer_hmar_config(hmar_sd)
        vae_cfg = infer_vqvae_config(_shapes(vae_sd), hmar_cfg.patch_nums)
        print(f"read off the checkpoints: VQVAE {vae_cfg}\nHMAR {hmar_cfg}")
    params = convert_pair(vae_sd, hmar_sd, vae_cfg, hmar_cfg)
    return params, {"family": "hmar", "vae": dataclasses.asdict(vae_cfg), "hmar": dataclasses.asdict(hmar_cfg)}


# ---- fixtures -------------------------------------------------------------------------------------------------------
def hmar_configs_from_fixture(meta: dict) -> tuple[MSVQConfig, HMARConfig]:
    """Both configs from an HMAR fixture's JSON (`vae_ctor`, `hmar_ctor`: the official classes' constructor
    arguments; `config`)."""
    vae_cfg, ns_cfg = var_configs_from_fixture(
        {"vae_ctor": meta["vae_ctor"], "var_ctor": meta["hmar_ctor"], "config": meta.get("config", {})}
    )
    ctor = meta["hmar_ctor"]
    n = ctor.get("n_layers_train", meta.get("config", {}).get("n_layers_train"))
    kw = dict(dataclasses.asdict(ns_cfg), attn_mask="scale_block_diagonal")
    if n is not None:
        kw["mask_layers"] = int(n)
    return vae_cfg, HMARConfig(**kw)
