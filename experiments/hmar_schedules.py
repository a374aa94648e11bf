"""The refinement schedule is a sampling setting: one trained digits HMAR sampled under several schedules.

    python experiments/hmar_schedules.py --workdir=workdir/digits_hmar --out=experiments/results

Loads a finished `configs/digits_hmar.py` run (its last stage's export) and, for each schedule below, draws
`--per_class` samples of every digit with the same keys, then scores them as the training report does: class
fidelity (a classifier fit on the real held-out digits) and the digits FID against the held-out split beside the
real-data floor (as many real train images, the same classes). Writes `digits_hmar_schedules_cpu.json` and one
grid per schedule (`digits_hmar_schedule_<name>.png`).
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

# per scale (n_0, n_1, ...) for patch_nums (1, 2, 3, 4); "none" samples with the next-scale branch alone
SCHEDULES = {
    "none": None,
    "config": ((1,), (1, 3), (1, 3, 5), (4, 6, 6)),  # configs/digits_hmar.py
    "coarse_only": ((1,), (1, 3), (1, 3, 5), (16,)),  # like the released one: refine the small scales only
    "fixture": ((1,), (1, 3), (2, 3, 4), (4, 4, 8)),  # the golden fixture's main run
    "last_scale_heavy": ((1,), (4,), (9,), (4, 4, 4, 4)),  # only the 4x4 scale, three mask steps
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdir/digits_hmar", help="a finished digits_hmar run")
    p.add_argument("--config", default="configs/digits_hmar.py")
    p.add_argument("--per_class", type=int, default=40)
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    config = load_config(args.config)
    family, vae, model = build_models(config)
    _, params = load_pretrained(args.workdir, family=family.name)
    tok_p, gen_p = params[family.tokenizer_key], params[family.generator_key]
    labels = np.repeat(np.arange(model.config.num_classes, dtype=np.int32), args.per_class)
    scorer = DigitsScorer.fit(config, labels)
    base = family.sampler(model, vae, config.sampling.to_dict())
    rows = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, schedule in SCHEDULES.items():
        sampler = base.with_settings(refine=False) if schedule is None else base.with_settings(mask_schedule=schedule)
        t0 = time.perf_counter()
        images = np.asarray(sampler(gen_p, tok_p, labels, jax.random.key(10_000)).images)
        elapsed = time.perf_counter() - t0
        rows[name] = {
            "mask_schedule": schedule,
            **scorer.score(images, labels),
            "sample_s_with_compile": round(elapsed, 2),
        }
        print(name, rows[name])
        save_class_grid(images, model.config.num_classes, args.per_class, out / f"digits_hmar_schedule_{name}.png")
    result = {
        "command": f"python experiments/hmar_schedules.py --workdir={args.workdir} --per_class={args.per_class}",
        "device": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "num_samples": len(labels),
        "sampling": config.sampling.to_dict(),
        "digits_fid_real_floor": scorer.floor,
        "digits_fid_real_floor_std": scorer.floor_std,
        "schedules": rows,
    }
    (out / "digits_hmar_schedules_cpu.json").write_text(json.dumps(result, indent=1, default=list))


if __name__ == "__main__":
    main()
