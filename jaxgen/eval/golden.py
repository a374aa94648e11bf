"""Golden check of the evaluator against `../shared/fixtures/eval/` (made with ADM's evaluator, pytorch-fid and
torch-fidelity at random Inception weights): `python -m jaxgen.convert.verify --family eval FIXTURE.npz`.

`run_eval_fixture` rebuilds the weights from the npz, runs both input pipelines on the fixture's images and the
statistics on its synthetic feature sets, and returns jaxgen's outputs under the fixture's `out/` names (without
the prefix) plus `metrics/<set>/{fid,precision,recall,is_split<N>}`. `eval_reference` is what they are compared
with: the npz's `out/` tensors and the JSON's metric values (ADM's FID; the exact float64 precision / recall).
ADM's float16 radii and decisions (`NOT_COMPARED`) are not reproducible bit for bit (README) and are left out of
the comparison; jaxgen's exact ones are dumped as `stat_<set>_exact_*`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.eval import metrics
from jaxgen.eval.inception import FIDInceptionV3, preprocess
from jaxgen.eval.inception_weights import params_from_state_dict

PIPELINE_PREFIX = {"adm": "adm", "pytorch_fid": "pfid"}
NOT_COMPARED = ("_adm_radii_", "_adm_sample_in_ref_manifold", "_adm_ref_in_sample_manifold")
FULL_SIGMA_MAX_DIM = 512  # covariances up to this size are dumped whole, larger ones as their diagonals


def fixture_state_dict(npz) -> dict[str, np.ndarray]:
    """The fixture's weights: `inception_int8/<name>` * `inception_scale/<name>` (exact) and `inception/<name>`."""
    sd = {k[len("inception/") :]: npz[k] for k in npz.files if k.startswith("inception/")}
    for k in npz.files:
        if k.startswith("inception_int8/"):
            name = k[len("inception_int8/") :]
            sd[name] = npz[k].astype(np.float32) * npz[f"inception_scale/{name}"].astype(np.float32)
    return sd


def network_outputs(npz, params) -> dict[str, np.ndarray]:
    """Both pipelines on every `in/img<S>_u8` image set: pool, spatial, logits (with / without bias), probs, block
    means, and channel 0 of image 0 after each pipeline's resize (0..255 for ADM, 0..1 for pytorch-fid)."""
    model = FIDInceptionV3()
    net = jax.jit(lambda x: model.apply({"params": params}, x))
    out = {}
    for key in sorted(k for k in npz.files if k.startswith("in/img") and k.endswith("_u8")):
        side = key[len("in/img") : -len("_u8")]
        images = jnp.asarray(npz[key])
        for pipeline, prefix in PIPELINE_PREFIX.items():
            x = jax.jit(preprocess, static_argnums=1)(images, pipeline)
            name = f"{prefix}_s{side}"
            for k, v in net(x).items():
                out[f"{name}_{k}"] = np.asarray(v)
            if pipeline == "adm":
                out[f"{name}_probs"] = np.asarray(jax.nn.softmax(out[f"{name}_logits_unbiased"], axis=-1))
                out[f"{name}_resized0_c0"] = np.asarray(x[0, :, :, 0]) * 128.0 + 128.0
            else:
                out[f"{name}_resized0_c0"] = (np.asarray(x[0, :, :, 0]) + 1.0) / 2.0
    return out


def _feature_sets(npz) -> list[str]:
    head, tail = "in/stat_", "_ref_q"
    return sorted(k[len(head) : -len(tail)] for k in npz.files if k.startswith(head) and k.endswith(tail))


def statistics_outputs(npz, meta: dict, fc_weight: np.ndarray) -> dict[str, np.ndarray]:
    """Means, covariances, exact radii and decisions, FID, precision / recall and IS of every synthetic set."""
    step = float(meta.get("feature_quant_step", 1.0 / 32.0))
    split_sizes = [int(s) for s in meta["config"].get("adm_is_split_sizes", [5000])]
    out = {}
    for name in _feature_sets(npz):
        ref = npz[f"in/stat_{name}_ref_q"].astype(np.float32) * np.float32(step)
        sample = npz[f"in/stat_{name}_sample_q"].astype(np.float32) * np.float32(step)
        stats = {}
        for which, feats in (("ref", ref), ("sample", sample)):
            s = metrics.feature_statistics(feats)
            stats[which] = s
            out[f"stat_{name}_mu_{which}"] = np.asarray(s.mu)
            out[f"stat_{name}_sigma_{which}_diag"] = np.diagonal(s.sigma).copy()
            if s.sigma.shape[0] <= FULL_SIGMA_MAX_DIM:
                out[f"stat_{name}_sigma_{which}"] = np.asarray(s.sigma)
        out[f"metrics/{name}/fid"] = np.float64(metrics.frechet_distance(stats["sample"], stats["ref"]))
        pr = metrics.precision_recall(ref, sample, k=3)
        out[f"metrics/{name}/precision"] = np.float64(pr.precision)
        out[f"metrics/{name}/recall"] = np.float64(pr.recall)
        out[f"stat_{name}_exact_radii_ref"] = np.asarray(pr.radii_ref, np.float32)
        out[f"stat_{name}_exact_radii_sample"] = np.asarray(pr.radii_sample, np.float32)
        out[f"stat_{name}_exact_sample_in_ref_manifold"] = np.asarray(pr.sample_in_ref_manifold, np.uint8)
        out[f"stat_{name}_exact_ref_in_sample_manifold"] = np.asarray(pr.ref_in_sample_manifold, np.uint8)
        if ref.shape[1] == fc_weight.shape[1]:  # IS only where the features are pool features
            logits = np.asarray(jnp.dot(sample, fc_weight.T, precision=jax.lax.Precision.HIGHEST))
            for n in split_sizes:
                out[f"metrics/{name}/is_split{n}"] = np.float64(metrics.inception_score(logits, split_size=n))
    return out


def run_eval_fixture(npz_path: str | Path, meta: dict) -> dict[str, np.ndarray]:
    """jaxgen's outputs for an eval fixture, named as its `out/` keys (plus `metrics/...` and the exact PR)."""
    with np.load(npz_path) as npz:
        sd = fixture_state_dict(npz)
        params = params_from_state_dict(sd, source=str(npz_path))
        out = network_outputs(npz, params)
        out.update(statistics_outputs(npz, meta, sd["fc.weight"]))
    return out


def eval_reference(npz_path: str | Path, meta: dict) -> dict[str, np.ndarray]:
    """What `run_eval_fixture` is compared with: the npz's `out/` tensors (minus ADM's float16 ones) and the
    JSON's ADM FID, exact float64 precision / recall and ADM IS of the sample set per split size."""
    with np.load(npz_path) as npz:
        ref = {k[4:]: npz[k] for k in npz.files if k.startswith("out/") and not any(s in k for s in NOT_COMPARED)}
    for name, entry in meta["stats"].items():
        results = entry["results"]
        ref[f"metrics/{name}/fid"] = np.float64(results["fid_adm"])
        ref[f"metrics/{name}/precision"] = np.float64(results["precision_exact_f64"])
        ref[f"metrics/{name}/recall"] = np.float64(results["recall_exact_f64"])
        for key, value in results.items():
            if key.startswith("is_adm_sample_split"):
                ref[f"metrics/{name}/is_split{key[len('is_adm_sample_split') :]}"] = np.float64(value)
    return ref
