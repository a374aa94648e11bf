"""Official LlamaGen checkpoints (FoundationVision/LlamaGen) -> jaxgen params.

GPT (class-conditional `c2i_*.pt`): one state_dict, names mapped mechanically (`layers.3.attention.wqkv.weight` ->
`layers_3/attention/wqkv/kernel`, transposed), `cls_embedding.embedding_table.` -> `cls_embedding.`. Accounted-for
non-parameters: `freqs_cis` (the RoPE table some checkpoints carry; checked against the config when present) and
per-layer `attention.kv_cache.{k,v}_cache` buffers (saved only after `setup_caches`). Any other key is reported.

VQ tokenizer (`vq_ds16_c2i.pt`): upstream's `conv_blocks.i.res.j` / `mid.0-2` names map onto jaxgen's shared convnet
(`down_i/block_j`, `mid/block_1|attn_1|block_2`; the decoder's `conv_blocks.i` is level n-1-i), and each attention
block's separate 1x1 `q`, `k`, `v` convs are packed into one `qkv` conv. `quantize.codebook_used` (a usage counter)
is ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import ConversionError, KeyMap, apply_plan, load_state_dict, nchw, plan_conversion
from jaxgen.models.generators.next_token import NextTokenConfig, NextTokenTransformer
from jaxgen.models.layer_stack import in_layout, unrolled
from jaxgen.models.layers import rope_2d_table, token_cross_entropy
from jaxgen.models.tokenizers.vqgan import VQGAN, VQConfig
from jaxgen.sampling.next_token import NextTokenSampler, NextTokenSampling

# ==== GPT ===========================================================================================================
GPT_KEYMAP = KeyMap(
    renames=((r"^cls_embedding\.embedding_table\.", "cls_embedding."),),
    ignore=(r"^freqs_cis$", r"^layers\.\d+\.attention\.kv_cache\.[kv]_cache$"),
)

# Upstream's GPT_models sizes: (dim, n_layer, n_head) -> name (all c2i models use n_kv_head = n_head and no
# ffn_dim_multiplier). n_head cannot be read from a state_dict (wqkv has (n_head + 2 kv) * head_dim = 3 dim rows
# whatever the split), so `infer_gpt_config` takes it from here by dim, else assumes head_dim 64.
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
    "XXL": (1536, 48, 24),
    "XXXL": (2560, 48, 40),
    "1B": (2048, 22, 32),
    "3B": (3200, 24, 32),
    "7B": (4096, 32, 32),
}
_HEADS_BY_DIM = {dim: heads for dim, _, heads in GPT_SIZES.values()}
_CONFIG_VARIANTS = ("B", "L", "XL", "XXL", "3B")  # the ones configs/llamagen_imagenet.py has


def gpt_param_shapes(config: NextTokenConfig):
    """The Flax param tree of `NextTokenTransformer(config)` as shapes (`jax.eval_shape`, nothing allocated)."""
    model = NextTokenTransformer(config)
    labels, tokens = jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), labels, tokens)["params"]


def _num_layers(shapes: Mapping[str, tuple]) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _size_name(dim, n_layer) -> str | None:
    for name, (d, n, _) in GPT_SIZES.items():
        if (d, n) == (dim, n_layer):
            return name
    return None


def infer_gpt_config(shapes: Mapping[str, tuple], **overrides) -> NextTokenConfig:
    """Read dim, n_layer, vocab, num_classes, KV heads and the FFN width off a GPT state_dict.

    Not in the shapes, so from `overrides` or defaults: `n_head` (upstream's head count for a known dim, else
    dim // 64: every released LlamaGen GPT but 3B (head_dim 100) and 7B (128) has head_dim 64), `block_size` (from a
    `freqs_cis` entry when present, else 256), `class_dropout_prob` (0.1: the class table then has num_classes + 1
    rows; pass 0.0 for a table without the null row), `ffn_dim_multiplier` / `multiple_of` (the FFN width read from
    `w1` must agree with the rule; a ConversionError says so if not)."""
    try:
        vocab, dim = (int(d) for d in shapes["tok_embeddings.weight"])
        class_rows = int(shapes["cls_embedding.embedding_table.weight"][0])
        qkv_rows = int(shapes["layers.0.attention.wqkv.weight"][0])
        hidden = int(shapes["layers.0.feed_forward.w1.weight"][0])
    except KeyError as e:
        raise ConversionError(f"not a LlamaGen GPT (c2i) state_dict: key {e} is missing") from e
    kw: dict = dict(vocab_size=vocab, dim=dim, n_layer=_num_layers(shapes))
    kw.update(overrides)
    kw.setdefault("n_head", _HEADS_BY_DIM.get(dim, max(dim // 64, 1)))
    kw.setdefault("class_dropout_prob", 0.1)
    kw.setdefault("num_classes", class_rows - int(kw["class_dropout_prob"] > 0))
    head_dim = dim // kw["n_head"]
    kv = (qkv_rows // head_dim - kw["n_head"]) // 2
    if "n_kv_head" not in kw and kv != kw["n_head"]:
        kw["n_kv_head"] = kv
    if "block_size" not in kw and "freqs_cis" in shapes:
        kw["block_size"] = int(shapes["freqs_cis"][0]) - kw.get("cls_token_num", 1)
    config = NextTokenConfig(**kw)
    if config.ffn_hidden != hidden:
        raise ConversionError(
            f"the checkpoint's FFN width is {hidden} but the LlamaGen rule gives {config.ffn_hidden} for dim {dim} "
            f"(multiple_of {config.multiple_of}, ffn_dim_multiplier {config.ffn_dim_multiplier}): pass the "
            f"ffn_dim_multiplier / multiple_of the model was built with"
        )
    return config


def _gpt_hint(shapes: Mapping[str, tuple], config: NextTokenConfig) -> str:
    n_layer = _num_layers(shapes)
    dim = shapes.get("tok_embeddings.weight", (None, None))[1]
    if n_layer and dim and (n_layer, dim) != (config.n_layer, config.dim):
        name = _size_name(dim, n_layer)
        mine = _size_name(config.dim, config.n_layer)
        what = f"GPT-{name}" if name else "an unknown size"
        use = (
            f"configs/llamagen_imagenet.py:{name}"
            if name in _CONFIG_VARIANTS
            else "a config with those sizes (infer_gpt_config(shapes) reads them)"
        )
        return (
            f"the checkpoint has {n_layer} layers, dim {dim} ({what}) but the config has n_layer {config.n_layer}, "
            f"dim {config.dim}{f' (GPT-{mine})' if mine else ''}: use {use} or the matching checkpoint"
        )
    vocab = shapes.get("tok_embeddings.weight", (None,))[0]
    if vocab and vocab != config.vocab_size:
        return f"the checkpoint's vocab is {vocab} but the config's vocab_size is {config.vocab_size}"
    return ""


def plan_gpt(shapes: Mapping[str, tuple], config: NextTokenConfig):
    """Check a GPT state_dict's keys and shapes against `config` (shapes only); return the plan."""
    return plan_conversion(
        shapes, gpt_param_shapes(unrolled(config)), GPT_KEYMAP, "LlamaGen GPT state_dict", _gpt_hint(shapes, config)
    )


def convert_gpt(state_dict: Mapping[str, np.ndarray], config: NextTokenConfig) -> dict:
    """GPT state_dict (numpy, PyTorch names) -> jaxgen `params` of `NextTokenTransformer(config)`.

    A `freqs_cis` entry, when present, must be the RoPE table the config builds (same grid / head_dim / base)."""
    steps = plan_gpt({k: v.shape for k, v in state_dict.items()}, config)
    if "freqs_cis" in state_dict:
        got = np.asarray(state_dict["freqs_cis"], np.float32)
        want = config.rope_table()
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-4):
            raise ConversionError(
                f"the checkpoint's freqs_cis {got.shape} is not the RoPE table of the config {want.shape} "
                f"(block_size {config.block_size}, head_dim {config.head_dim}, rope_base {config.rope_base}, "
                f"rope_2d {config.rope_2d}): set block_size = (image_size // 16)**2 of the checkpoint"
            )
    return in_layout(apply_plan(steps, state_dict), config, gpt_param_shapes)


def check_vocab(gpt_config: NextTokenConfig, codebook_size: int) -> None:
    """Raise a clear ValueError when the GPT's vocabulary and the tokenizer's codebook differ."""
    if gpt_config.vocab_size != codebook_size:
        raise ValueError(
            f"GPT vocab_size {gpt_config.vocab_size} != tokenizer codebook_size {codebook_size}: the GPT's token ids "
            f"index the tokenizer's codebook, so they must be equal; set gpt.vocab_size = {codebook_size} or use the "
            f"tokenizer the GPT was trained with"
        )


# ==== VQ tokenizer ================================================================================================
def vq_keymap(decoder_levels: int) -> KeyMap:
    """LlamaGen's VQ names -> jaxgen's convnet names. The decoder's `conv_blocks.i` is level decoder_levels-1-i."""
    return KeyMap(
        renames=(
            (r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
            (r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1."),
            (r"^decoder\.conv_blocks\.(\d+)\.", lambda m: f"decoder.up.{decoder_levels - 1 - int(m.group(1))}."),
            (r"^decoder\.up\.(\d+)\.res\.", r"decoder.up.\1.block."),
            (r"\.mid\.0\.", ".mid.block_1."),
            (r"\.mid\.1\.", ".mid.attn_1."),
            (r"\.mid\.2\.", ".mid.block_2."),
        ),
        ignore=(r"^quantize\.codebook_used$",),
    )


def pack_qkv(state: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate each attention block's separate 1x1 `q`, `k`, `v` convs into one `qkv` (output channels q | k | v).

    Works on arrays and on shape tuples (for shape-only planning). The `.mid.1.` blocks must be renamed first, so this
    runs on upstream names: `...mid.1.q.weight` and `...attn.0.q.weight`.
    """
    out, groups = {}, {}
    for key, value in state.items():
        m = re.match(r"^(.*\.(?:attn\.\d+|mid\.1))\.([qkv])\.(weight|bias)$", key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, leaf), parts in groups.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConversionError(f"{prefix}: attention needs q, k and v {leaf}s, found only {sorted(parts)}")
        q, k, v = parts["q"], parts["k"], parts["v"]
        if isinstance(q, tuple):
            out[f"{prefix}.qkv.{leaf}"] = (q[0] + k[0] + v[0], *q[1:])
        else:
            out[f"{prefix}.qkv.{leaf}"] = np.concatenate([q, k, v], axis=0)
    return out


def vq_param_shapes(config: VQConfig):
    s = 2 * config.downsample
    return jax.eval_shape(VQGAN(config).init, jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"]


def plan_vq(shapes: Mapping[str, tuple], config: VQConfig):
    """Check a VQ-16-style state_dict's keys and shapes against `config` (shapes only); return the plan."""
    packed = pack_qkv({k: tuple(int(d) for d in v) for k, v in shapes.items()})
    return plan_conversion(packed, vq_param_shapes(config), vq_keymap(len(config.decoder_ch_mult)), "VQ state_dict")


def convert_vq(state_dict: Mapping[str, np.ndarray], config: VQConfig) -> dict:
    """LlamaGen VQ state_dict (numpy, PyTorch names) -> jaxgen `params` of `VQGAN(config)`."""
    packed = pack_qkv(state_dict)
    return apply_plan(plan_vq({k: v.shape for k, v in state_dict.items()}, config), packed)


def infer_vq_config(shapes: Mapping[str, tuple], **overrides) -> VQConfig:
    """Read ch, ch_mult, res blocks, z_channels, codebook size and dim off a VQ state_dict."""
    try:
        ch = int(shapes["encoder.conv_in.weight"][0])
        levels = _count(shapes, r"encoder\.conv_blocks\.(\d+)\.")
        ch_mult = tuple(int(shapes[f"encoder.conv_blocks.{i}.res.0.conv1.weight"][0]) // ch for i in range(levels))
        dec_levels = _count(shapes, r"decoder\.conv_blocks\.(\d+)\.")
        dec_mult = tuple(
            int(shapes[f"decoder.conv_blocks.{dec_levels - 1 - i}.res.0.conv1.weight"][0]) // ch
            for i in range(dec_levels)
        )
        size, dim = (int(d) for d in shapes["quantize.embedding.weight"])
        kw = dict(
            codebook_size=size,
            codebook_embed_dim=dim,
            z_channels=int(shapes["encoder.conv_out.weight"][0]),
            ch=ch,
            ch_mult=ch_mult,
            decoder_ch_mult=dec_mult,
            num_res_blocks=_count(shapes, r"encoder\.conv_blocks\.0\.res\.(\d+)\."),
        )
    except KeyError as e:
        raise ConversionError(f"not a LlamaGen VQ state_dict: key {e} is missing") from e
    kw.update(overrides)
    return VQConfig(**kw)


def _count(shapes, pattern: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


# ---- the golden check (`python -m jaxgen.convert.verify --family llamagen`) ----------------------------------
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


def run_llamagen_fixture(npz_path: Path, meta: dict, scan_layers: bool = False) -> dict[str, np.ndarray]:
    """All of a LlamaGen fixture's `out/` tensors, computed by jaxgen from its `in/` tensors (PyTorch layouts); with
    `scan_layers` by the scanned GPT (the converted params stacked)."""
    vq_cfg, gpt_cfg = llamagen_configs_from_fixture(meta)
    gpt_cfg = dataclasses.replace(gpt_cfg, scan_layers=scan_layers)
    vq, gpt = VQGAN(vq_cfg), NextTokenTransformer(gpt_cfg)
    vq_params = convert_vq(load_state_dict(npz_path, "vq/"), vq_cfg)
    gpt_params = convert_gpt(load_state_dict(npz_path, "gpt/"), gpt_cfg)
    vq_p, gpt_p = {"params": vq_params}, {"params": gpt_params}
    inputs = load_state_dict(npz_path, "in/")
    img = jnp.asarray(np.transpose(inputs["images"], (0, 2, 3, 1)))
    out: dict[str, np.ndarray] = {}

    out["vq_encoder_out"] = nchw(vq.apply(vq_p, img, method=lambda m, x: m.encoder(x)))
    out["vq_pre_quant"] = nchw(vq.apply(vq_p, img, method=VQGAN.pre_quant))
    quant, idx = vq.apply(vq_p, img, method=VQGAN.encode)
    out["vq_quant"] = nchw(quant)
    out["vq_indices"] = np.asarray(idx, np.int64)
    out["vq_recon"] = nchw(vq.apply(vq_p, quant, method=VQGAN.decode))
    out["vq_recon_from_codes"] = nchw(vq.apply(vq_p, idx, tuple(quant.shape[1:3]), method=VQGAN.decode_code))

    tokens = jnp.asarray(inputs["gpt_tokens"], jnp.int32)
    logits = gpt.apply(gpt_p, jnp.asarray(inputs["gpt_labels"], jnp.int32), tokens[:, :-1])
    out["gpt_logits"] = np.asarray(logits)
    out["gpt_loss"] = np.asarray(token_cross_entropy(logits, tokens))

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
        out[f"gen_{name}_images"] = nchw(sample.decoded)
    out["gpt_freqs_cis"] = rope_2d_table(gpt_cfg.grid_size, gpt_cfg.head_dim, gpt_cfg.rope_base, gpt_cfg.cls_token_num)
    return out
