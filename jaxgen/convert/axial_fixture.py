"""The Axial Transformer's golden check: `python -m jaxgen.convert.verify --family axial FIXTURE.npz [--dump OUT]`.

The fixture holds up to two models made with the official code at random weights: `gray` (the one-channel
`Transformer2d`) and `rgb` (the channel-at-a-time `Transformer3d`); their sizes come from the JSON beside it
(`gray_ctor`, `rgb_ctor`). Their `axial/...` variables go through the converter (`jaxgen.convert.axial`), then every
reference output is recomputed: teacher-forcing logits, per-(sub)pixel NLL in nats, bits per dim, the samples for the
fixture's Gumbel noise (the cached sampler), the teacher-forcing logits on them and each sampled value's margin, and
the intermediate activations under the fixture's names (rgb: one forward per channel k, `channel_logits`).

Activations are produced for every block (its output, and its sub-steps from the LayerNorm to the MLP branch); the
result keeps the names the fixture has, so a fixture that stores the sub-steps of other blocks is covered too.
jaxgen's attention never forms the softmax weights (the kernel path is flash attention), so `<block>/attn_probs` is
recomputed here: softmax(q k^T / sqrt(head_dim)) of jaxgen's own sown q and k, with the block's causal mask. It checks
the scores and the mask; the attention output itself is checked by `<block>/attn_heads`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.axial import convert_variables, infer_axial_config, model_variables, read_variables
from jaxgen.models.generators.axial import AxialTransformer, bits_per_dim
from jaxgen.models.tokenizers.pixels import PixelConfig, PixelTokenizer
from jaxgen.sampling.axial import AxialSampler

_SUBSTEPS = ("layernorm_attn", "q", "k", "v", "attn_heads", "attn_branch", "resid_mid", "layernorm_mlp",
             "mlp_branch", "out")  # fmt: skip
_TOP = ("emb", "outer_in", "u", "inner_in", "final_ln")
_EXTERIOR = ("ext_input_planes", "ext_conv", "ext_in", "cond")
KINDS = {"gray": "transformer2d/", "rgb": "ar_decoder/"}  # fixture model -> its variables' top-level scope


def _build(variables: dict[str, np.ndarray], ctor: dict):
    """(model, params) from the converted variables; the sizes read off them must be the JSON constructor's."""
    shapes = {k: tuple(v.shape) for k, v in variables.items()}
    config = infer_axial_config(shapes, num_heads=int(ctor["num_heads"]))
    want = dict(height=ctor["img_height"], width=ctor["img_width"], channels=ctor.get("img_channels", 1),
                hidden_size=ctor["emb_dim"], mlp_factor=ctor["hdim_factor"], num_outer_layers=ctor["num_outer_layers"],
                num_inner_layers=ctor["num_inner_layers"])  # fmt: skip
    if "num_exterior_layers" in ctor and want["channels"] > 1:
        want["num_exterior_layers"] = ctor["num_exterior_layers"]
    got = {k: getattr(config, k) for k in want}
    if got != want:
        raise ValueError(f"the fixture's variables give {got}, its JSON constructor says {want}")
    if ctor.get("num_embs", 256) != 256:
        raise ValueError(f"the fixture's model has num_embs {ctor['num_embs']}; jaxgen's is for 8-bit pixels (256)")
    return AxialTransformer(config), convert_variables(variables, config)


def attn_probs(q_bhwnd: np.ndarray, k_bhwnd: np.ndarray, axis: str, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(hd)) along `axis` ("row": over W, "col": over H), `[B, H, W, heads, L]`, masked to key
    index <= query index along the axis when `causal` (float64 inside)."""
    q, k = np.asarray(q_bhwnd, np.float64), np.asarray(k_bhwnd, np.float64)
    spec = "bhwnd,bhvnd->bhwnv" if axis == "row" else "bhwnd,bgwnd->bhwng"
    scores = np.einsum(spec, q, k) / np.sqrt(q.shape[-1])
    if causal:
        length = scores.shape[-1]
        keep = np.arange(length)[None, :] <= np.arange(length)[:, None]  # [query position, key position]
        keep = keep[None, None, :, None, :] if axis == "row" else keep[None, :, None, None, :]
        scores = np.where(keep, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def _sown(acts: dict, name: str) -> np.ndarray:
    """A sown activation (the first call's); a LayerNorm's output is sown as `<its module name>_out`."""
    value = acts.get(f"{name}_out", acts.get(name))
    if not isinstance(value, tuple):
        raise KeyError(f"jaxgen sowed no {name!r} here (has: {sorted(acts)})")
    return np.asarray(value[0])


def _block_acts(acts: dict, name: str, axis: str, causal: bool, prefix: str, out: dict) -> None:
    block = acts[name]
    for step in _SUBSTEPS:
        out[f"{prefix}{name}/{step}"] = _sown(block, step)
    out[f"{prefix}{name}/attn_probs"] = attn_probs(_sown(block, "q"), _sown(block, "k"), axis, causal)


def _pairs(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers // 2) for kind in ("row", "col")]


def _intermediates(model: AxialTransformer):
    """jitted (params, x `[B, H, W, C]`, channel `[B]`) -> the sown intermediates of `channel_logits`."""

    def run(params, x_bhwc, channel_b):
        labels = jnp.zeros((x_bhwc.shape[0],), jnp.int32)
        _, state = model.apply({"params": params}, labels, x_bhwc, channel_b, method=AxialTransformer.channel_logits,
                               mutable=["intermediates"])  # fmt: skip
        return state["intermediates"]

    return jax.jit(run)


def _activations(model: AxialTransformer, acts: dict, prefix: str) -> dict[str, np.ndarray]:
    """Every intermediate of one channel's forward (`_intermediates`), under the fixture's names."""
    c = model.config
    acts2d, out = acts["transformer2d"], {}
    for name in _TOP:
        out[prefix + name] = _sown(acts2d, name)
    for name in _pairs("outer", c.num_outer_layers):  # unmasked rows, causal columns
        _block_acts(acts2d, name, "row" if "_row_" in name else "col", "_col_" in name, prefix, out)
    inner = [f"inner_row_{i}" for i in range(c.num_inner_layers)]
    for name in inner:
        _block_acts(acts2d, name, "row", True, prefix, out)
    out[prefix + "inner_out"] = out[f"{prefix}{inner[-1]}/out"]
    if c.channels > 1:
        for name in _EXTERIOR:
            out[prefix + name] = _sown(acts, name)
        for name in _pairs("exterior", c.num_exterior_layers):  # all unmasked
            _block_acts(acts, name, "row" if "_row_" in name else "col", False, prefix, out)
    return out


def _model_outputs(prefix: str, model, params, x_bhwc, noise_bhwck) -> dict[str, np.ndarray]:
    """Teacher forcing, NLL, bits per dim, the samples for the noise, their logits and margins (`[B, H, W, C, ...]`)."""
    labels = np.zeros(x_bhwc.shape[0], np.int32)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, labels, x))
    logits = np.asarray(apply(params, x_bhwc))
    nll, bpd = bits_per_dim(logits, x_bhwc)
    sampler = AxialSampler(model, PixelTokenizer(PixelConfig(channels=model.config.channels)))
    samples = np.asarray(sampler.with_noise(params, labels, noise_bhwck))
    sample_logits = np.asarray(apply(params, samples))
    perturbed = np.sort(sample_logits + noise_bhwck, axis=-1)
    margin = perturbed[..., -1] - perturbed[..., -2]
    out = {"logits": logits, "nll": np.asarray(nll), "bpd": np.asarray(bpd), "samples": samples,
           "sample_logits": sample_logits, "sample_margin": margin}  # fmt: skip
    return {f"{prefix}{k}": v for k, v in out.items()}


def run_axial_fixture(fixture: Path, meta: dict) -> dict[str, np.ndarray]:
    """Every `out/` tensor of the fixture, recomputed by jaxgen, under the fixture's names (without `out/`)."""
    arrays = read_variables(fixture)
    wanted = {k.removeprefix("out/") for k in arrays if k.startswith("out/")}
    out: dict[str, np.ndarray] = {}
    for kind, scope in KINDS.items():
        if f"in/{kind}/x" not in arrays:
            continue
        variables = model_variables({k: v for k, v in arrays.items() if k.startswith(scope)})
        model, params = _build(variables, meta[f"{kind}_ctor"])
        x = np.asarray(arrays[f"in/{kind}/x"], np.int32)
        noise = np.asarray(arrays[f"in/{kind}/noise"], np.float32)
        gray = x.ndim == 3  # the one-channel fixture has no channel axis: [B, H, W] and [B, H, W, 256]
        if gray:
            x, noise = x[..., None], noise[..., None, :]
        outputs = _model_outputs(f"{kind}/", model, params, x, noise)
        if gray:
            outputs = {k: v if k.endswith("/bpd") else v[:, :, :, 0] for k, v in outputs.items()}
        out.update(outputs)
        intermediates = _intermediates(model)
        for k in range(model.config.channels):
            acts = intermediates(params, x, jnp.full((x.shape[0],), k, jnp.int32))
            out.update(_activations(model, acts, f"{kind}/act/" if gray else f"{kind}/act/c{k}/"))
        out[f"{kind}/act/pos_embs"] = np.asarray(model.apply({"params": params}, method=AxialTransformer.pos2d))
    # The fixture stores the sub-steps of a few blocks only: keep its names (a missing one still fails verify).
    return {k: v for k, v in out.items() if k in wanted} if wanted else out
