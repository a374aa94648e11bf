"""Sampling temperature and top-k are sampling settings: one trained digits Axial Transformer sampled under several.

    python experiments/axial_temperatures.py --workdir=workdir/digits_axial --out=experiments/results

Loads a finished `configs/digits_axial.py` run (its export) and, for each setting below, draws `--per_class` samples
of every digit with the same key, then scores them as the training report does: class fidelity (a classifier fit on
the real held-out digits) and the digits FID against the held-out split beside the real-data floor (as many real
train images, the same classes). Writes `digits_axial_temperatures_cpu.json` and one grid per setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from digits_scores import DigitsScorer, save_class_grid

from jaxgen.config_util import load_config
from jaxgen.families import build_models
from jaxgen.pretrained import load_pretrained

SETTINGS = {
    "t1.0": dict(temperature=1.0),  # upstream's draw, the config's
    "t0.95": dict(temperature=0.95),
    "t0.9": dict(temperature=0.9),
    "t0.8": dict(temperature=0.8),
    "t1.0_top_k8": dict(temperature=1.0, top_k=8),
    "t1.0_top_k4": dict(temperature=1.0, top_k=4),
    "t0.9_top_k8": dict(temperature=0.9, top_k=8),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdir/digits_axial", help="a finished digits_axial run")
    p.add_argument("--config", default="configs/digits_axial.py")
    p.add_argument("--per_class", type=int, default=40)
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    config = load_config(args.config)
    family, pixels, model = build_models(config)
    _, params = load_pretrained(args.workdir, family=family.name)
    gen_p = params[family.generator_key]
    labels = np.repeat(np.arange(model.config.num_classes, dtype=np.int32), args.per_class)
    scorer = DigitsScorer.fit(config, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, setting in SETTINGS.items():
        sampler = family.sampler(model, pixels, {**config.sampling.to_dict(), **setting})
        t0 = time.perf_counter()
        images = np.asarray(sampler(gen_p, {}, labels, jax.random.key(10_000)).images)
        elapsed = time.perf_counter() - t0
        rows[name] = {
            "sampling": {**config.sampling.to_dict(), **setting},
            **scorer.score(images, labels),
            "sample_s_with_compile": round(elapsed, 2),
        }
        print(name, rows[name])
        save_class_grid(images, model.config.num_classes, args.per_class, out / f"digits_axial_{name}.png")
    result = {
        "command": f"python experiments/axial_temperatures.py --workdir={args.workdir} --per_class={args.per_class}",
        "device": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "num_samples": len(labels),
        "digits_fid_real_floor": scorer.floor,
        "digits_fid_real_floor_std": scorer.floor_std,
        "settings": rows,
    }
    (out / "digits_axial_temperatures_cpu.json").write_text(json.dumps(result, indent=1, default=list))


if __name__ == "__main__":
    main()
