"""Inpainting and class-conditional editing with a trained digits MaskGIT (the notebook's edit cell, measured).

    python experiments/maskgit_edits.py --workdir=workdir/digits_maskgit --out=experiments/results

Encodes `--num` train digits, masks the bottom half of each token grid and runs `MaskedSampler.edit` twice: with the
digit's own label (inpainting) and with label + 1 (class-conditional editing). Writes `digits_maskgit_edits_cpu.json`
(kept tokens unchanged, and how the class-fidelity classifier, fit on the held-out digits, classifies the results)
and `digits_maskgit_edits.png` (rows: real, tokens, masked, inpainted, class + 1).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import numpy as np

from jaxgen import data as data_lib
from jaxgen.config_util import load_config
from jaxgen.eval.class_fidelity import fit_classifier
from jaxgen.eval.grids import save_grid
from jaxgen.families import build_models
from jaxgen.pretrained import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdir/digits_maskgit", help="a finished digits_maskgit run")
    p.add_argument("--config", default="configs/digits_maskgit.py")
    p.add_argument("--num", type=int, default=200, help="train digits to edit")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    config = load_config(args.config)
    family, vq, model = build_models(config)
    _, params = load_pretrained(args.workdir, family=family.name)
    held_out = data_lib.load_eval_arrays(config.data, config.data.eval_split)
    train = data_lib.load_eval_arrays(config.data, config.data.train_split)
    classifier = fit_classifier(held_out["image"], held_out["label"], seed=int(config.seed))
    images, labels = train["image"][: args.num], train["label"][: args.num].astype(np.int32)

    tok_p, gen_p = params[family.tokenizer_key], params[family.generator_key]
    ids = np.asarray(vq.apply({"params": tok_p}, images, method="encode_ids"))
    g = math.isqrt(ids.shape[1])
    canvas = ids.reshape(-1, g, g).copy()
    canvas[:, g // 2 :, :] = -1
    canvas = canvas.reshape(len(ids), -1)
    sampler = family.sampler(model, vq, config.sampling.to_dict())
    inpainted = sampler.edit(gen_p, tok_p, labels, canvas, jax.random.key(0))
    target = (labels + 1) % model.config.num_classes
    edited = sampler.edit(gen_p, tok_p, target, canvas, jax.random.key(1))
    recon = np.asarray(vq.apply({"params": tok_p}, ids, method="decode_ids"))

    kept = canvas >= 0
    fidelity = lambda x, y: classifier.score(x, y)["class_fidelity"]
    result = {
        "command": f"python experiments/maskgit_edits.py --workdir={args.workdir} --num={args.num}",
        "device": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "num_images": len(labels),
        "masked": "bottom half of the token grid",
        "sampling": config.sampling.to_dict(),
        "kept_tokens_unchanged": bool(
            np.all(np.asarray(inpainted.tokens)[kept] == ids[kept])
            and np.all(np.asarray(edited.tokens)[kept] == ids[kept])
        ),
        "reconstruction_classified_as_own_class": fidelity(recon, labels),
        "inpainted_classified_as_own_class": fidelity(np.asarray(inpainted.images) * 2 - 1, labels),
        "edited_classified_as_new_class": fidelity(np.asarray(edited.images) * 2 - 1, target),
        "edited_classified_as_old_class": fidelity(np.asarray(edited.images) * 2 - 1, labels),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_maskgit_edits_cpu.json").write_text(json.dumps(result, indent=1))
    n = min(10, len(labels))
    masked = (images[:n] + 1) / 2
    masked[:, masked.shape[1] // 2 :] = 0.5
    rows = [(images[:n] + 1) / 2, (np.clip(recon[:n], -1, 1) + 1) / 2, masked]
    rows += [np.asarray(inpainted.images)[:n], np.asarray(edited.images)[:n]]
    save_grid(np.concatenate(rows), out / "digits_maskgit_edits.png", nrow=n,
              row_labels=["real", "tokens", "masked", "inpainted", "class + 1"], scale=4)  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
