"""Digits FID: a Frechet distance in the feature space of a small classifier trained on the real digits.

On the embedded 8x8 scikit-learn digits the ImageNet InceptionV3 is the wrong lens (and its weights may not be
installed), so the features here come from a classifier of the digits themselves. Images are made grayscale and
area-pooled to 8x8 (`class_fidelity.pooled_features`: any image size maps to the same 64 inputs); an MLP
(scikit-learn `MLPClassifier`, hidden layers 128-64, ReLU, Adam, `random_state=seed`, one BLAS thread) is fitted on
the real TRAIN split; the features of an image are its last hidden layer before the ReLU (64-d: the affine output,
so no unit is dead and the covariance of a few hundred images has full rank). `reference(held_out)` holds the
statistics (`jaxgen.eval.metrics.feature_statistics`) of the held-out split, `distance(samples, ref)` is
`metrics.frechet_distance` of the samples' statistics to it.

FID grows as the sample count falls (the covariance of N samples is noisy), so a number is only comparable with
one from as many samples: `real_floors` scores as many real TRAIN images, with the same class counts, against the
same reference (10 random draws: their mean is the floor, their spread how far one draw wanders); a perfect
generator would land there. Labels are not used: images drawn for the wrong classes score exactly as the right
ones would (a "shuffled-class" set of real images is the floor); the class-fidelity classifier measures that.

Measured with `python -m jaxgen.eval.digits_fid` (digits from `jaxgen.data`: train 1501 images, held-out 296;
seed 0; deterministic, except the fit time: 1.5 s on a 2-core CPU, 124 Adam epochs):

                                                     16 px         32 px
    classifier accuracy on the held-out digits       0.976         0.980
    held-out vs all train real                       0.67          0.67
    held-out vs 200 train real, class-matched: floor 1.72 +- 0.21  1.67 +- 0.22  mean +- std, 10 draws
        ... 40 train real                            9.7 +- 1.7    9.8 +- 1.8
        ... 20 train real                            15.1 +- 3.4   14.9 +- 3.3
    held-out half vs the other half (148 vs 148)     15.5          13.5          both sides small and noisy
    held-out vs 200 blurred held-out (Gaussian 1 px) 13.5          1.8           1 px at 32 px: half a 16 px one
    held-out vs 200 blurred held-out (Gaussian 2 px) 77            12.8
    held-out vs 153 train images of one class (3)    280           283
    held-out vs 200 pixel-shuffled held-out          290           347
    held-out vs 200 uniform-noise images             504           535

So at 200 samples the real floor is ~1.7: a mild blur scores 8x that, noise ~300x. Below ~100 samples the floor
itself rises fast (64-d covariances of few samples), so the training-time evals use a few hundred.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from jaxgen.eval import metrics
from jaxgen.eval.class_fidelity import _check_images, _check_labels, _check_real_range, pooled_features

HIDDEN_LAYERS = (128, 64)
FEATURE_DIM = HIDDEN_LAYERS[-1]  # the features are the last hidden layer's pre-activations
_MAX_ITER = 300  # Adam epochs at most (it stops on a training-loss plateau, ~124 epochs on the digits)
_ALPHA = 1e-3  # L2 penalty


@dataclasses.dataclass(frozen=True)
class DigitsFID:
    """The fitted feature extractor: `fit` it once on real train images, then `reference` / `distance`."""

    hidden: tuple[tuple[np.ndarray, np.ndarray], ...] = dataclasses.field(repr=False)  # (W [in, out], b [out])
    head: tuple[np.ndarray, np.ndarray] = dataclasses.field(repr=False)  # the output layer (W, b)
    classes: tuple[int, ...]  # the labels seen in fitting, sorted (the head's outputs, in order)
    num_train: int
    seed: int

    @classmethod
    def fit(cls, train_images, train_labels, *, seed: int = 0) -> DigitsFID:
        """Fit the classifier on real `train_images [N, H, W, C]` (finite floats in [-1, 1]) and `train_labels [N]`
        (integers, at least 2 classes). Deterministic for a given input and `seed`; a few seconds on 2 cores."""
        x = _check_images(train_images, "train_images")
        y = _check_labels(train_labels, len(x), "train_labels")
        classes = tuple(int(c) for c in np.unique(y))
        if len(classes) < 2:
            raise ValueError(f"DigitsFID.fit needs images of at least 2 classes, got {len(x)} of {list(classes)}")
        _check_real_range(x, "train_images")
        clf = MLPClassifier(hidden_layer_sizes=HIDDEN_LAYERS, alpha=_ALPHA, max_iter=_MAX_ITER, random_state=seed)
        with threadpool_limits(1), warnings.catch_warnings():  # one BLAS thread: faster on small matrices, same sums
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(pooled_features(x), y)
        weights = zip(clf.coefs_, clf.intercepts_, strict=True)
        layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in weights]
        return cls(hidden=tuple(layers[:-1]), head=layers[-1], classes=classes, num_train=len(x), seed=seed)

    def _hidden(self, images) -> np.ndarray:
        h = pooled_features(images)
        with threadpool_limits(1):
            for i, (w, b) in enumerate(self.hidden):
                h = (np.maximum(h, 0.0) if i else h) @ w + b
        return h

    def features(self, images) -> np.ndarray:
        """`[N, H, W, C]` floats (in [-1, 1]) -> `[N, FEATURE_DIM]` float64: the last hidden layer before its ReLU."""
        return self._hidden(images)

    def predict(self, images) -> np.ndarray:
        """`[N, H, W, C]` floats in [-1, 1] -> `[N]` int64 predicted classes."""
        w, b = self.head
        with threadpool_limits(1):
            logits = np.maximum(self._hidden(images), 0.0) @ w + b
        if len(self.classes) == 2:  # scikit-learn's binary head: one logit for the second class
            return np.asarray(self.classes, np.int64)[(logits[:, 0] > 0).astype(np.int64)]
        return np.asarray(self.classes, np.int64)[np.argmax(logits, axis=1)]

    def accuracy(self, images, labels) -> float:
        """Accuracy on real `images` (finite, in [-1, 1]) with true `labels`, e.g. a held-out split."""
        x = _check_images(images, "images")
        y = _check_labels(labels, len(x), "labels")
        if len(x) == 0:
            raise ValueError("DigitsFID.accuracy needs at least one image")
        _check_real_range(x, "images")
        return float(np.mean(self.predict(x) == y))

    def reference(self, images) -> metrics.FeatureStats:
        """The feature statistics of real `images [N, H, W, C]` (finite, in [-1, 1]; N >= 2, best a few hundred:
        more than FEATURE_DIM for a full-rank covariance), e.g. the held-out split."""
        x = _check_images(images, "images")
        if len(x) < 2:
            raise ValueError(f"DigitsFID.reference needs at least 2 images (a covariance), got {len(x)}")
        _check_real_range(x, "images")
        return metrics.feature_statistics(self.features(x))

    def distance(self, sample_images, ref: metrics.FeatureStats) -> float:
        """The digits FID of `sample_images [N, H, W, C]` (floats in [-1, 1], N >= 2) to `ref` (from `reference`).

        Finite pixels are clipped to [-1, 1] (decoders overshoot slightly); if any pixel is NaN/inf the result is
        NaN. Compare it with `real_floor` for as many samples; with N <= FEATURE_DIM the samples' covariance is
        rank-deficient (still a number, but a noisy one)."""
        x = _check_images(sample_images, "sample_images")
        if len(x) < 2:
            raise ValueError(f"DigitsFID.distance needs at least 2 samples (a covariance), got {len(x)}")
        if np.shape(ref.mu) != (FEATURE_DIM,):
            raise ValueError(f"ref has {np.shape(ref.mu)} features, not ({FEATURE_DIM},): make it with .reference()")
        if not np.all(np.isfinite(x)):
            return float("nan")
        stats = metrics.feature_statistics(self.features(np.clip(x, -1.0, 1.0)))
        with warnings.catch_warnings():
            if len(x) <= FEATURE_DIM:  # a rank-deficient covariance is expected: scipy's "singular" warning is noise
                warnings.simplefilter("ignore", LinAlgWarning)
            return float(metrics.frechet_distance(stats, ref))

    def real_floors(
        self, train_images, train_labels, want_labels, ref: metrics.FeatureStats, *, draws: int = 10, seed: int = 0
    ) -> np.ndarray:
        """`[draws]` digits FIDs of real `train_images`, each a random subset with the class counts of `want_labels`
        (the labels the samples were drawn for; `matched_subset`, seeds `seed`, `seed + 1`, ...), to `ref`: what a
        perfect generator would score with as many samples, and how much that varies from draw to draw."""
        if draws < 1:
            raise ValueError(f"real_floors needs draws >= 1, got {draws}")
        x = np.asarray(train_images)
        return np.asarray(
            [self.distance(x[matched_subset(train_labels, want_labels, seed=seed + i)], ref) for i in range(draws)]
        )

    def real_floor(self, train_images, train_labels, want_labels, ref: metrics.FeatureStats, **kwargs) -> float:
        """The mean of `real_floors` (same arguments): the floor to compare a `distance` of as many samples with."""
        return float(np.mean(self.real_floors(train_images, train_labels, want_labels, ref, **kwargs)))


def matched_subset(labels, want_labels, *, seed: int = 0) -> np.ndarray:
    """Indices `idx [N]` int64 into `labels [M]` with `labels[idx] == want_labels [N]`: per class a seeded random
    choice, without replacement (with replacement where the class has fewer examples than wanted). A wanted class
    absent from `labels` is a ValueError."""
    y = np.asarray(labels)
    want = np.asarray(want_labels).reshape(-1)
    rng = np.random.default_rng(seed)
    idx = np.zeros(len(want), np.int64)
    for c in np.unique(want):
        slots, pool = np.flatnonzero(want == c), np.flatnonzero(y == c)
        if len(pool) == 0:
            raise ValueError(f"class {int(c)} is wanted {len(slots)} times but the real images have none")
        idx[slots] = rng.choice(pool, size=len(slots), replace=len(pool) < len(slots))
    return idx


def _measure(image_size: int = 16, seed: int = 0, n: int = 200) -> dict[str, float]:
    """The numbers of the module docstring."""
    from scipy.ndimage import gaussian_filter

    from jaxgen import data as data_lib
    from jaxgen.train.sections import digits_data_section

    cfg = digits_data_section(image_size=image_size)
    train = data_lib.load_eval_arrays(cfg, cfg["train_split"])
    held = data_lib.load_eval_arrays(cfg, cfg["eval_split"])
    t0 = time.perf_counter()
    fid = DigitsFID.fit(train["image"], train["label"], seed=seed)
    fit_s = time.perf_counter() - t0
    ref = fid.reference(held["image"])
    rng = np.random.default_rng(seed)
    some = held["image"][rng.permutation(len(held["image"]))[:n]]
    blur = {s: np.stack([gaussian_filter(x, sigma=(s, s, 0)) for x in some]) for s in (1.0, 2.0)}
    pix = rng.permutation(image_size * image_size)
    shuffled = some.reshape(len(some), -1, some.shape[-1])[:, pix].reshape(some.shape)
    one_class = train["image"][np.flatnonzero(train["label"] == 3)[:n]]
    balanced = np.arange(n) % len(fid.classes)
    floors = {m: fid.real_floors(train["image"], train["label"], balanced[:m], ref, seed=seed) for m in (20, 40, n)}
    halves = metrics.frechet_distance(fid.reference(held["image"][0::2]), fid.reference(held["image"][1::2]))
    return {
        "fit_s": fit_s,
        "accuracy_held_out": fid.accuracy(held["image"], held["label"]),
        "floor_all_train": fid.distance(train["image"], ref),
        **{f"floor_{m}_mean": float(np.mean(f)) for m, f in floors.items()},
        **{f"floor_{m}_std": float(np.std(f)) for m, f in floors.items()},
        "held_out_halves": float(halves),
        "blur_1px": fid.distance(blur[1.0], ref),
        "blur_2px": fid.distance(blur[2.0], ref),
        "one_class": fid.distance(one_class, ref),
        "pixel_shuffled": fid.distance(shuffled, ref),
        "noise": fid.distance(rng.uniform(-1.0, 1.0, some.shape), ref),
    }


if __name__ == "__main__":
    for size in (16, 32):
        print(f"{size} px:", {k: round(v, 3) for k, v in _measure(size).items()})
