"""Shared timing and report code of the sampling benchmarks (`bench_*_sampling.py`).

Each benchmark times jaxgen's compiled sampler (`compile_s` apart from `run_s`) and, optionally, the official PyTorch
code in the same process; every time is the median of `repeats` runs after one warm-up. The JSON report carries the
command, the device, the software versions and the jaxgen / official speedups.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

OFFICIAL = "official_pytorch"


def median_time(fn: Callable[[int], Any], repeats: int) -> tuple[float, list[float]]:
    """(median, all times) of `fn(i)` for i = 1..repeats, after one warm-up call `fn(0)`. `fn` must block until its
    work is done (`jax.block_until_ready`, `torch.cuda.synchronize`); `i` can seed each run differently."""
    fn(0)
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def compile_timed(lowered) -> tuple[Any, float]:
    """(`lowered.compile()`, its wall time in seconds)."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def torch_sync(device: str) -> None:
    """Wait for the queued CUDA work (a no-op on CPU, where torch runs synchronously)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "kind": dev.device_kind,
        "count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries that ran (torch only where the official side imported it)."""
    import flax
    import jaxlib
    import numpy as np

    out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    out |= {"flax": flax.__version__, "numpy": np.__version__}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def speedup_ratios(results: Sequence[dict], key: str = "images_per_s") -> dict[str, float]:
    """{"[<model>_<what>_]<dtype>_b<batch>": jaxgen / official} of `key` for every official result with a jaxgen
    twin (same batch, dtype and, where rows carry them, model / what / losses)."""
    ratios = {}
    same = ("batch", "dtype", "model", "what", "losses")  # the identity of a row (absent keys match absent keys)
    for r in results:
        if r.get("impl") != OFFICIAL:
            continue
        ours = [x for x in results if x["impl"] == "jaxgen" and all(x.get(k) == r.get(k) for k in same)]
        if ours:
            name = "_".join(str(r[k]) for k in ("model", "what") if k in r)
            ratios[f"{name + '_' if name else ''}{r['dtype']}_b{r['batch']}"] = round(ours[0][key] / r[key], 3)
    return ratios


def write_report(benchmark: str, out: str | Path, results: Sequence[dict], **fields) -> Path:
    """Write `{"benchmark", **fields, "device", "jax", "versions", "command", "results", "speedup_...", "date"}` as
    JSON to `out` (its folder is created) and return the path."""
    report = {
        "benchmark": benchmark,
        **fields,
        "device": device_info(),
        "jax": jax.__version__,
        "versions": versions(),
        "command": " ".join(sys.argv),
        "results": list(results),
        "speedup_jaxgen_over_official": speedup_ratios(results),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return out


def emit(results: list[dict], result: dict) -> None:
    """Append a result, with the 1-minute load average when it finished (the benchmark's own threads count: a value
    well above the threads it uses means other processes shared the CPU), and print it as one JSON line."""
    result["load_1m"] = round(os.getloadavg()[0], 2)
    results.append(result)
    print(json.dumps(result), flush=True)
