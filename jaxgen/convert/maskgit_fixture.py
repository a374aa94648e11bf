"""The MaskGIT golden check (`python -m jaxgen.convert.verify --family maskgit FIXTURE.npz`): rebuild both models
from the fixture's JSON, load its weights, and compute every `out/` tensor from its `in/` tensors.

The fixture drives upstream's [0, 1] image boundary (`MaskGITVQ.encode_unit` / `decode_unit`) and its parallel
decode with a raw uint32 key, the cosine schedule and -1 as the mask."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import load_state_dict
from jaxgen.convert.maskgit import convert_tokenizer, convert_transformer
from jaxgen.models.generators.masked import MaskedConfig, MaskedTransformer
from jaxgen.models.tokenizers.maskgit_vq import MaskGITVQ, MaskGITVQConfig
from jaxgen.sampling.mask_schedule import schedule
from jaxgen.sampling.masked import MaskedSampling, parallel_decode


def configs_from_fixture(meta: dict) -> tuple[MaskGITVQConfig, MaskedConfig]:
    """The two model configs a fixture's JSON describes (upstream's constructor arguments)."""
    tc, t, cfg = meta["tokenizer_config"], meta["transformer_ctor"], meta["config"]
    vq = MaskGITVQConfig(
        codebook_size=tc["codebook_size"],
        embedding_dim=tc["embedding_dim"],
        filters=tc["filters"],
        channel_multipliers=tuple(tc["channel_multipliers"]),
        num_res_blocks=tc["num_res_blocks"],
        beta=tc.get("commitment_cost", 0.25),
    )
    transformer = MaskedConfig(
        codebook_size=tc["codebook_size"],
        num_classes=cfg["num_class"],
        num_tokens=t["max_position_embeddings"] - 1,
        hidden_size=t["hidden_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        intermediate_size=t["intermediate_size"],
        dropout=t.get("hidden_dropout_prob", 0.1),
        attention_dropout=t.get("attention_probs_dropout_prob", 0.1),
        initializer_range=t.get("initializer_range", 0.02),
    )
    return vq, transformer


def _run_name(temperature: float) -> str:
    """The fixture's run tag of a choice temperature: 4.5 -> "t4.5", 0.0 -> "t0"."""
    return f"t{temperature:g}"


def run_maskgit_fixture(npz_path: Path, meta: dict, scan_layers: bool = False) -> dict[str, np.ndarray]:
    """All of a MaskGIT fixture's `out/` tensors, computed by jaxgen; with `scan_layers` by the scanned transformer
    (the converted params stacked)."""
    vq_cfg, tf_cfg = configs_from_fixture(meta)
    tf_cfg = dataclasses.replace(tf_cfg, scan_layers=scan_layers)
    vq, model = MaskGITVQ(vq_cfg), MaskedTransformer(tf_cfg)
    vq_p = {"params": convert_tokenizer(load_state_dict(npz_path, "tokenizer/"), vq_cfg)}
    tf_p = {"params": convert_transformer(load_state_dict(npz_path, "transformer/"), tf_cfg)}
    inputs = load_state_dict(npz_path, "in/")
    out: dict[str, np.ndarray] = {}

    # Tokenizer, at upstream's [0, 1] boundary.
    img = jnp.asarray(inputs["tok_image"])
    enc = vq.apply(vq_p, img, method=MaskGITVQ.encode_unit)
    ids = vq.apply(vq_p, enc, method=lambda m, z: m.quantizer.lookup(z))
    grid = enc.shape[1:3]
    out["tok_encoder"] = np.asarray(enc)
    out["tok_indices"] = np.asarray(ids, np.int32).reshape(ids.shape[0], *grid)
    codes = vq.apply(vq_p, ids, method=MaskGITVQ.codes)
    out["tok_quantized"] = np.asarray(codes)
    out["tok_decoded"] = np.asarray(vq.apply(vq_p, codes, method=MaskGITVQ.decode_unit))
    latent = jnp.asarray(inputs["tok_latent_for_decoder"])
    out["tok_decoded_from_latent"] = np.asarray(vq.apply(vq_p, latent, method=MaskGITVQ.decode_unit))

    # Transformer on the fixture's half-masked sequences (-1 = mask).
    out["tf_logits"] = np.asarray(model.apply(tf_p, jnp.asarray(inputs["tf_input_ids"], jnp.int32)))

    # Mask schedules.
    ratios = jnp.asarray(inputs["sched_ratios"], jnp.float32)
    for method in meta["config"]["sched_methods"]:
        out[f"sched_{method}"] = np.asarray(schedule(ratios, tf_cfg.num_tokens, method), np.float32)

    # Parallel decode, once per choice temperature, from the same raw key.
    d = meta["decode"]
    k = tf_cfg.codebook_size
    logits_fn = jax.jit(lambda seq: model.apply(tf_p, seq)[..., :k])
    init = jnp.asarray(inputs["dec_init_ids"], jnp.int32)
    key = jax.random.wrap_key_data(jnp.asarray(inputs["dec_rng_key"], jnp.uint32))
    for temperature in d["choice_temperatures"]:
        settings = MaskedSampling(
            num_iter=d["num_iter"],
            start_iter=d["start_iter"],
            choice_temperature=float(temperature),
            schedule=d["mask_scheduling_method"],
            return_steps=True,
        )
        final_seqs, trace = parallel_decode(logits_fn, init, key, settings, k)
        r = _run_name(temperature)
        out[f"dec_{r}_final_seqs"] = np.asarray(final_seqs, np.int32)
        tokens = final_seqs[:, -1, 1:]
        image = vq.apply(vq_p, vq.apply(vq_p, tokens, method=MaskGITVQ.codes), method=MaskGITVQ.decode_unit)
        out[f"dec_{r}_image"] = np.asarray(image)
        for field in dataclasses.fields(trace):  # step_ids, step_logits, ..., the fixture's names
            out[f"dec_{r}_{field.name}"] = np.asarray(getattr(trace, field.name))
    return out
