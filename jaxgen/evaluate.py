"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch, as the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) that the VAR / LlamaGen / HMAR / MaskGIT papers use computes them.

    python -m jaxgen.evaluate --samples=samples_50000x256x256x3.npz --ref=VIRTUAL_imagenet256_labeled.npz
    python -m jaxgen.evaluate --samples=workdir/samples/ --ref=REF.npz --weights=pt_inception-2015-12-05-6726825d.pth

`--samples`: an ADM npz (`arr_0` uint8 [N, H, W, 3]), a directory of the chunk npz files `jaxgen.sample
--num_samples` writes, or a directory of PNG / JPEG images. `--ref`: an ADM reference batch (`arr_0` and / or
precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, which then replace the statistics of its images as in ADM).
`--weights`: FID Inception weights (default: `$JAXGEN_INCEPTION_WEIGHTS` or ~/.cache/jaxgen/, see
docs/inception_weights.md). Features are extracted in batches split over the local devices; the statistics follow
`jaxgen.eval.metrics` (float64 covariances, scipy's sqrtm, exact precision / recall with k = 3). Prints (and with
`--out` writes) one JSON object. A user error ends in one `error:` line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from jaxgen import cli
from jaxgen.eval import adm_npz, metrics
from jaxgen.eval.inception import PIPELINES, InceptionExtractor
from jaxgen.eval.inception_weights import default_weights_path, find_default_weights, load_inception_params


def define_flags() -> dict:
    """The binary's absl flags, defined only when it runs (`python -m jaxgen.evaluate`): importing this module
    defines none, so it can share a process with the other binaries (`--batch_size` is also jaxgen.sample's)."""
    return dict(
        samples=flags.DEFINE_string("samples", None, "sample batch: ADM .npz, a directory of chunk .npz or of images"),
        ref=flags.DEFINE_string("ref", None, "reference batch: ADM .npz with arr_0 and / or mu, sigma, mu_s, sigma_s"),
        weights=flags.DEFINE_string("weights", "", "FID Inception weights (.npz / .pth / fid-helper .pt)"),
        pipeline=flags.DEFINE_enum("pipeline", "adm", PIPELINES, "input pipeline: adm (TF1 resize) or pytorch_fid"),
        batch_size=flags.DEFINE_integer("batch_size", 64, "images per Inception call (split over the local devices)"),
        is_split_size=flags.DEFINE_integer("is_split_size", 5000, "IS: consecutive chunks of this many samples"),
        is_shuffled=flags.DEFINE_bool("is_shuffled", False, "also torch-fidelity's IS (10 shuffled splits)"),
        k=flags.DEFINE_integer("k", 3, "precision / recall: the k-th nearest neighbour radius"),
        out=flags.DEFINE_string("out", "", "also write the JSON here"),
    )


def resolve_weights(path: str) -> Path:
    """The weight file to use: `path`, or the default location; FileNotFoundError (one line) when neither exists."""
    if path:
        return Path(path).expanduser()
    found = find_default_weights()
    if found is None:
        raise FileNotFoundError(
            f"no FID Inception weights at {default_weights_path()}: pass --weights=FILE (pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth) or convert it once with `python -m jaxgen.convert inception "
            "--pth FILE` (docs/inception_weights.md)"
        )
    return found


def extract(extractor: InceptionExtractor, source, what: str) -> dict[str, np.ndarray]:
    """Features of every image of `source` (anything with `num_images` and `iter_batches`), with a progress bar."""
    from tqdm import tqdm

    parts = []
    with tqdm(total=source.num_images, desc=f"inception {what}", unit="img", disable=None) as bar:
        for feats in extractor.iter_features(source.iter_batches(extractor.batch_size)):
            parts.append(feats)
            bar.update(len(next(iter(feats.values()))))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _stats(feats: np.ndarray | None, mu, sigma, what: str) -> metrics.FeatureStats:
    if mu is not None and sigma is not None:
        return metrics.FeatureStats(mu=np.asarray(mu, np.float32), sigma=np.asarray(sigma, np.float64), num=0)
    if feats is None:
        raise ValueError(f"{what}: neither images nor precomputed statistics")
    return metrics.feature_statistics(feats)


def evaluate(
    samples: str,
    ref: str,
    weights: str = "",
    *,
    pipeline: str = "adm",
    batch_size: int = 64,
    is_split_size: int = 5000,
    is_shuffled: bool = False,
    k: int = 3,
) -> dict:
    """The ADM evaluator's numbers for `samples` against `ref` (paths as the flags); returns the report dict."""
    t0 = time.perf_counter()
    sample_src = adm_npz.open_samples(samples)  # each input is checked before anything compiles
    ref_stats_file = adm_npz.read_stats(ref)
    ref_src = adm_npz.open_reference_images(ref)  # None when the reference holds statistics only
    if ref_src is not None and ref_src.num_images == 0:
        ref_src = None
    if ref_src is None and not {"mu", "sigma"} <= set(ref_stats_file):
        raise ValueError(f"{ref} has neither arr_0 images nor mu / sigma statistics")
    if sample_src.num_images < k + 1:
        raise ValueError(f"{samples} holds {sample_src.num_images} images; precision / recall need at least {k + 1}")
    weights_path = resolve_weights(weights)
    extractor = InceptionExtractor(load_inception_params(weights_path), pipeline=pipeline, batch_size=batch_size)
    sample = extract(extractor, sample_src, "samples")
    ref_feats = extract(extractor, ref_src, "reference") if ref_src is not None else {}

    report = {"samples": str(samples), "ref": str(ref), "num_samples": int(sample_src.num_images)}
    report["num_ref_images"] = int(ref_src.num_images) if ref_src is not None else 0
    s_pool = metrics.feature_statistics(sample["pool"])
    r_pool = _stats(ref_feats.get("pool"), ref_stats_file.get("mu"), ref_stats_file.get("sigma"), f"{ref} pool")
    report["fid"] = metrics.frechet_distance(s_pool, r_pool)
    if "spatial" in ref_feats or {"mu_s", "sigma_s"} <= set(ref_stats_file):
        s_sp = metrics.feature_statistics(sample["spatial"])
        r_sp = _stats(ref_feats.get("spatial"), ref_stats_file.get("mu_s"), ref_stats_file.get("sigma_s"), ref)
        report["sfid"] = metrics.frechet_distance(s_sp, r_sp)
    else:
        report["sfid"] = None
        logging.warning("sFID not computed: %s has neither images nor mu_s / sigma_s", ref)
    if "logits_unbiased" in sample:
        report["is"] = metrics.inception_score(sample["logits_unbiased"], split_size=is_split_size)
        if is_shuffled:
            report["is_shuffled_mean"], report["is_shuffled_std"] = metrics.inception_score_shuffled(
                sample["logits_unbiased"]
            )
    else:
        report["is"] = None
        logging.warning("Inception Score not computed: %s has no softmax layer", weights_path)
    if "pool" in ref_feats:
        pr = metrics.precision_recall(ref_feats["pool"], sample["pool"], k=k)
        report["precision"], report["recall"] = pr.precision, pr.recall
    else:
        report["precision"] = report["recall"] = None
        logging.warning("precision / recall not computed: %s has no arr_0 images", ref)
    report.update(
        weights=str(weights_path),
        pipeline=pipeline,
        is_split_size=is_split_size,
        k=k,
        wall_s=round(time.perf_counter() - t0, 1),
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    )
    return report


def run(flag: dict) -> dict:
    report = evaluate(
        flag["samples"].value,
        flag["ref"].value,
        flag["weights"].value,
        pipeline=flag["pipeline"].value,
        batch_size=flag["batch_size"].value,
        is_split_size=flag["is_split_size"].value,
        is_shuffled=flag["is_shuffled"].value,
        k=flag["k"].value,
    )
    if flag["out"].value:
        Path(flag["out"].value).write_text(json.dumps(report, indent=1))
    return report


def main(argv, flag: dict):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = cli.run_user_command(run, flag)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    _flags = define_flags()
    flags.mark_flags_as_required(["samples", "ref"])
    app.run(lambda argv: main(argv, _flags), flags_parser=cli.parse_flags)
