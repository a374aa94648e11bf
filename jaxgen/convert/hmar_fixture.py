"""The HMAR golden check (`python -m jaxgen.convert.verify --family hmar FIXTURE.npz`): rebuild VAR's VQVAE and the
HMAR transformer from the fixture's JSON, load its weights, and compute every `out/` tensor from its `in/` tensors.

Sampling runs are read from the JSON's `sampling` section: each run's top-k / top-p / cfg / schedule, `mask=False`
as `refine=False`, and upstream's draw replaced by the arg-max (`greedy`) where the fixture says so (its `draw`
field); with top_k 1 the upstream draw is deterministic and runs as is. The decoded images are those of the first (main)
run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.common import load_state_dict, nchw
from jaxgen.convert.hmar import convert_pair, hmar_configs_from_fixture
from jaxgen.convert.var import run_vqvae_outputs
from jaxgen.models.generators.hmar import HMARTransformer
from jaxgen.models.tokenizers.msvq import MultiScaleVQVAE
from jaxgen.sampling.hmar import HMARSampler, HMARSampling


def sampling_settings(run: dict) -> HMARSampling:
    """A fixture sampling run (`HMAR.generate`'s arguments) as jaxgen settings."""
    return HMARSampling(
        cfg=run["cfg"],
        top_k=run["top_k"],
        top_p=run["top_p"],
        greedy="arg-max" in run.get("draw", ""),
        refine=bool(run["mask"]),
        mask_schedule=run["mask_schedule"],
        return_trace=True,
    )


def masked_rows(indices: np.ndarray, num_rows: int) -> jnp.ndarray:
    """Upstream's stage-2 positions (indices into the L - first_l teacher-forcing rows) -> bool `[1, rows]`."""
    masked = np.zeros((1, num_rows), bool)
    masked[0, np.asarray(indices)] = True
    return jnp.asarray(masked)


def run_hmar_fixture(npz_path: Path, meta: dict, scan_layers: bool = False) -> dict[str, np.ndarray]:
    """All of an HMAR fixture's `out/` tensors, computed by jaxgen from its `in/` tensors (PyTorch layouts); with
    `scan_layers` by the scanned transformer (the converted params stacked)."""
    vae_cfg, cfg = hmar_configs_from_fixture(meta)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    vae, model = MultiScaleVQVAE(vae_cfg), HMARTransformer(cfg)
    params = convert_pair(load_state_dict(npz_path, "vae/"), load_state_dict(npz_path, "hmar/"), vae_cfg, cfg)
    vae_p, model_p = {"params": params["vae"]}, {"params": params["hmar"]}
    inputs = load_state_dict(npz_path, "in/")
    img = jnp.asarray(np.transpose(inputs["img"], (0, 2, 3, 1)))
    labels = jnp.asarray(inputs["labels"], jnp.int32)

    out, idx = run_vqvae_outputs(vae, vae_p, img)

    # Teacher forcing, both stages; the stage-1 losses under each weighting, stage 2's on the masked rows.
    from jaxgen.families.hmar import masked_cross_entropy, token_loss_weights

    x_ns = vae.apply(vae_p, idx, method=MultiScaleVQVAE.teacher_forcing_input)
    own = vae.apply(vae_p, idx, method=MultiScaleVQVAE.own_scale_input)
    masked = masked_rows(inputs["mp_idx_to_mask"], cfg.seq_len - cfg.first_l)
    out["ns_input"], out["mask_input"] = np.asarray(x_ns), np.asarray(own)
    nsp = model.apply(model_p, labels, x_ns)
    mp = model.apply(model_p, labels, x_ns, own, masked, method=HMARTransformer.masked_forward)
    out["nsp_logits"], out["mp_logits"] = np.asarray(nsp), np.asarray(mp)
    tokens = jnp.concatenate(idx, axis=1)
    ce = np.asarray(jax.vmap(jax.vmap(lambda lg, t: jax.nn.logsumexp(lg) - lg[t]))(nsp, tokens), np.float64)
    for weighting, name in (("lognorm", "lognorm"), ("equal", "equal"), ("mean", "default_unweighted")):
        w = token_loss_weights(cfg.patch_nums, weighting)
        out[f"nsp_loss_{name}"] = np.float32(np.mean(ce @ w))
        if weighting == "lognorm":
            out["nsp_loss_weight_lognorm"] = w
    loss, _ = masked_cross_entropy(mp[:, cfg.first_l :], tokens[:, cfg.first_l :], masked)
    out["mp_loss_mask_unweighted"] = np.asarray(loss)

    # Sampling: every run of the JSON, its trace under the fixture's names.
    gen_labels = jnp.asarray(inputs["gen_labels"], jnp.int32)
    for n, (run, spec) in enumerate(meta["sampling"].items()):
        sample = HMARSampler(model, vae, sampling_settings(spec))(
            params["hmar"], params["vae"], gen_labels, jax.random.key(spec.get("g_seed") or 0)
        )
        for name, value in sample.trace.items():
            value = np.asarray(value)
            if name.startswith("fhat_after"):
                value = nchw(value)
            elif "idx" in name:
                value = value.astype(np.int64)
            out[f"{run}_{name}"] = value
        for k, i in enumerate(sample.indices):
            out[f"{run}_idx_s{k}"] = np.asarray(i, np.int64)
        out[f"{run}_fhat"] = nchw(sample.f_hat)
        if n == 0:  # the images of the main run (the first)
            out[f"{run}_dec_raw"], out[f"{run}_img"] = nchw(sample.decoded), nchw(sample.images)
    return out
