"""The Axial Transformer's golden check: `python -m jaxgen.convert.verify --family axial FIXTURE.npz [--dump OUT]`.

The fixture holds two models made with the official code at random weights: `gray` (the one-channel
`Transformer2d`) and `rgb` (the channel-at-a-time `Transformer3d`); their sizes come from the JSON beside it
(`gray_ctor`, `rgb_ctor`). Their `axial/...` variables go through the converter (`jaxgen.convert.axial`), then every
reference output is recomputed: teacher-forcing logits, per-(sub)pixel NLL in nats, bits per dim, the samples for the
fixture's Gumbel noise (the cached sampler), the teacher-forcing logits on them and each sampled value's margin, and
the intermediate activations under the fixture's names. jaxgen's attention never forms the softmax weights (the
kernel path is flash attention), so `<block>/attn_probs` is softmax(q k^T / sqrt(hd)) of jaxgen's own q and k with the
block's mask.
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


def _build(variables: dict[str, np.ndarray], ctor: dict):
    """(model, params) from the converted variables; the sizes read off them must be the JSON's constructor's."""
    shapes = {k: tuple(v.shape) for k, v in variables.items()}
    config = infer_axial_config(shapes, num_heads=int(ctor["num_heads"]))
    want = dict(height=ctor["img_height"], width=ctor["img_width"], channels=ctor.get("img_channels", 1),
                hidden_size=ctor["emb_dim"], mlp_factor=ctor["hdim_factor"], num_outer_layers=ctor["num_outer_layers"],
                num_inner_layers=ctor["num_inner_layers"])  # fmt: skip
    got = {k: getattr(config, k) for k in want}
    if got != want:
        raise ValueError(f"the fixture's variables give {got}, its JSON says {want}")
    return AxialTransformer(config), convert_variables(variables, config)


def _probs(block_acts: dict, axis: str, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(hd)) along the block's axis, `[B, H, W, heads, L]`, from its sown q and k."""
    q, k = (np.asarray(block_acts[n][0], np.float64) for n in ("q", "k"))
    spec = "bhwnd,bhvnd->bhwnv" if axis == "row" else "bhwnd,bgwnd->bhwng"
    logits = np.einsum(spec, q, k) / np.sqrt(q.shape[-1])
    if causal:
        length = logits.shape[-1]
        own = np.arange(q.shape[2 if axis == "row" else 1])
        keep = np.arange(length)[None, :] <= own[:, None]  # [own position, key position]
        keep = keep[None, None, :, None, :] if axis == "row" else keep[None, :, None, None, :]
        logits = np.where(keep, logits, -np.inf)
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)


def _sown(acts: dict, name: str) -> np.ndarray:
    """A sown activation; a LayerNorm's output is sown as `<its module name>_out`."""
    return np.asarray((acts[name] if name in acts and isinstance(acts[name], tuple) else acts[f"{name}_out"])[0])


def _block_acts(acts: dict, name: str, prefix: str, out: dict, substeps: bool) -> None:
    block = acts[name]
    for step in _SUBSTEPS if substeps else ("out",):
        out[f"{prefix}{name}/{step}"] = _sown(block, step)
    if substeps:
        axis = "row" if "_row_" in name else "col"
        causal = name.startswith("inner") or name.startswith("outer_col")
        out[f"{prefix}{name}/attn_probs"] = _probs(block, axis, causal)


def _decoder_acts(acts2d: dict, model: AxialTransformer, prefix: str, out: dict, substeps: bool) -> None:
    """transformer2d's activations (with `substeps`, those of the first block of each kind too: the fixture stores
    them for the one-channel model, and for the conditioning stack's blocks of the three-channel one)."""
    c = model.config
    for name in _TOP:
        out[prefix + name] = _sown(acts2d, name)
    outer = [f"outer_{kind}_{i}" for i in range(c.num_outer_layers // 2) for kind in ("row", "col")]
    inner = [f"inner_row_{i}" for i in range(c.num_inner_layers)]
    for name in outer + inner:
        first = name in ("outer_row_0", "outer_col_0", "inner_row_0")
        _block_acts(acts2d, name, prefix, out, substeps=substeps and first)
    out[prefix + "inner_out"] = out[f"{prefix}{inner[-1]}/out"]


def _model_outputs(prefix: str, model, params, x_bhwc, noise_bhwck, squeeze: bool) -> dict[str, np.ndarray]:
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
    if squeeze:  # the one-channel fixture has no channel axis
        out = {k: v if k == "bpd" else v[:, :, :, 0] for k, v in out.items()}
    return {f"{prefix}{k}": v for k, v in out.items()}


def run_axial_fixture(fixture: Path, meta: dict) -> dict[str, np.ndarray]:
    """Every `out/` tensor of the fixture, recomputed by jaxgen, under the fixture's names (without `out/`)."""
    arrays = read_variables(fixture)
    out: dict[str, np.ndarray] = {}
    for kind, scope in (("gray", "transformer2d/"), ("rgb", "ar_decoder/")):
        variables = model_variables({k: v for k, v in arrays.items() if k.startswith(scope)})
        model, params = _build(variables, meta[f"{kind}_ctor"])
        x = arrays[f"in/{kind}/x"].astype(np.int32)
        noise = arrays[f"in/{kind}/noise"].astype(np.float32)
        if kind == "gray":
            x, noise = x[..., None], noise[..., None, :]
        out.update(_model_outputs(f"{kind}/", model, params, x, noise, squeeze=kind == "gray"))
        labels = np.zeros(x.shape[0], np.int32)
        for k in range(model.config.channels):
            channel = jnp.full((x.shape[0],), k, jnp.int32)
            _, state = model.apply({"params": params}, labels, x, channel, method=AxialTransformer.channel_logits,
                                   mutable=["intermediates"])  # fmt: skip
            acts = state["intermediates"]
            prefix = f"{kind}/act/" if kind == "gray" else f"{kind}/act/c{k}/"
            _decoder_acts(acts["transformer2d"], model, prefix, out, substeps=model.config.channels == 1)
            if model.config.channels > 1:
                for name in _EXTERIOR:
                    out[prefix + name] = np.asarray(acts[name][0])
                ext = [
                    f"exterior_{t}_{i}" for i in range(model.config.num_exterior_layers // 2) for t in ("row", "col")
                ]
                for name in ext:
                    _block_acts(acts, name, prefix, out, substeps=name in ("exterior_row_0", "exterior_col_0"))
        if kind == "gray":
            pos = model.apply({"params": params}, method=AxialTransformer.pos2d)
            out["gray/act/pos_embs"] = np.asarray(pos)
    return out
