"""What the sampling-setting experiments share: samples of a trained digits run scored as the training report
scores them, and their grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxgen import data as data_lib
from jaxgen.eval.class_fidelity import fit_classifier
from jaxgen.eval.digits_fid import DigitsFID
from jaxgen.eval.grids import save_grid


@dataclasses.dataclass(frozen=True)
class DigitsScorer:
    """Class fidelity (a classifier fit on the real held-out digits) and the digits FID against the held-out split,
    beside the real-data floor of as many real train images with the same classes (mean and std of 10 draws)."""

    fidelity: Any
    fid: DigitsFID
    ref: Any
    floor: float
    floor_std: float

    @classmethod
    def fit(cls, config, labels: np.ndarray) -> DigitsScorer:
        held_out = data_lib.load_eval_arrays(config.data, config.data.eval_split)
        train = data_lib.load_eval_arrays(config.data, config.data.train_split)
        seed = int(config.seed)
        fid = DigitsFID.fit(train["image"], train["label"], seed=seed)
        ref = fid.reference(held_out["image"])
        floors = fid.real_floors(train["image"], train["label"], labels, ref, seed=seed)
        fidelity = fit_classifier(held_out["image"], held_out["label"], seed=seed)
        return cls(fidelity, fid, ref, float(np.mean(floors)), float(np.std(floors)))

    def score(self, images01: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Samples `[N, H, W, 3]` in [0, 1] (the samplers' range) for `labels` `[N]`."""
        x = images01 * 2 - 1  # the classifiers read the data's [-1, 1]
        return {"class_fidelity": self.fidelity.score(x, labels)["class_fidelity"],
                "digits_fid": self.fid.distance(x, self.ref)}  # fmt: skip


def save_class_grid(images01: np.ndarray, num_classes: int, per_class: int, path: Path, columns: int = 8) -> None:
    """The first `columns` samples of each class (samples ordered class by class), one row per class."""
    grid = images01.reshape(num_classes, per_class, *images01.shape[1:])[:, :columns]
    save_grid(grid.reshape(-1, *images01.shape[1:]), path, nrow=columns, scale=4)
