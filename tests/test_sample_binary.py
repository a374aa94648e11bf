"""The sampling binary: a grid PNG, tokens and a report from a config; a misspelled override is an error."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from jaxgen.config_util import load_config
from jaxgen.eval.grids import image_grid
from jaxgen.sample import sample_grid

REPO = Path(__file__).resolve().parents[1]


def test_sample_grid_writes_png_tokens_and_report(tmp_path):
    cfg = load_config(str(REPO / "configs/var_tiny.py"))
    cfg.grid.classes = (0, 7)
    cfg.grid.per_class = 3
    cfg.vae.ch_mult, cfg.vae.num_res_blocks = (1, 2), 1  # an 8 px tokenizer: compiles in seconds
    report = sample_grid(cfg, tmp_path)
    img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 5  # a real picture, not a blank canvas
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape == (6, 8, 8, 3) and list(f["labels"]) == [0, 0, 0, 7, 7, 7]
        assert [f[f"indices_s{k}"].shape[1] for k in range(4)] == [1, 4, 9, 16]
    assert json.loads((tmp_path / "report.json").read_text())["num_images"] == report["num_images"] == 6


def test_image_grid_layout():
    imgs = np.zeros((5, 4, 4, 3))
    imgs[4] = 1.0
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    assert g[11:15, 1:5].min() == 255 and g[1:5, 1:5].max() == 0


def test_misspelled_override_names_the_field(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgen.sample",
            "--config=configs/var_tiny.py",
            "--config.sampling.topk=3",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "topk" in res.stderr
