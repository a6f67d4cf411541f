"""Linear probes: logistic-regression classifiers (scikit-learn, L-BFGS) on frozen embeddings.

Two probes, each an option:

- `linear_probe` needs only the evaluation set: it is split in two, stratified by class and seeded, the
  probe is fitted on one half with a fixed regularisation and scored on the other half.
- `fewshot_probe` is the few-shot protocol of CLIP_benchmark (`linear_probe.evaluate`): k samples per
  class from a train split, a regularisation strength chosen on a validation part held out of that split
  (the sweep of the CLIP paper, appendix A.3), and scores on a separate test split.
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from mmcl.errors import DataError

# Inverse L2 strengths tried by `fewshot_probe`, ascending: the CLIP paper's range (1e-6 to 1e6), at 2
# steps a decade rather than its 96 steps in all, which keeps a sweep to 25 fits.
REGULARISATION_GRID = np.logspace(-6, 6, 25)
MAX_ITER = 1000  # the CLIP paper's L-BFGS iteration cap
NO_SWEEP_REGULARISATION = 1.0  # scikit-learn's default C, used when no validation part is held out

Split = Tuple[np.ndarray, np.ndarray]  # (features (N, D), labels (N,))


def linear_probe(
    features: torch.Tensor, labels: torch.Tensor, seed: int = 0, held_out: float = 0.5, regularisation: float = 1.0
) -> Dict[str, float]:
    """{"acc1": held-out accuracy, "samples_fit": ..., "samples_scored": ...} of a probe on (N, D) features."""
    x, y = features.double().numpy(), labels.numpy()
    counts = torch.bincount(labels)
    stratify = y if counts[counts > 0].min() >= 2 else None  # stratify when every class can be split
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=held_out, random_state=seed, stratify=stratify)
    probe = LogisticRegression(C=regularisation, max_iter=2000)
    probe.fit(x_fit, y_fit)
    return {
        "acc1": float((probe.predict(x_test) == y_test).mean()),
        "samples_fit": len(y_fit),
        "samples_scored": len(y_test),
    }


def fewshot_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: int,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dict[str, float]:
    """A `shots`-per-class logistic-regression probe fitted on the train split and scored on the test split.

    Features are (N, D) float tensors, labels (N,) int64 class ids. The steps:

    1. Hold out `val_fraction` of the train split as a validation part, stratified by class and seeded
       (`train_test_split(..., stratify=labels, random_state=seed)`).
    2. From the rest, walk a seeded permutation (`np.random.default_rng(seed).permutation`) and keep the
       first `shots` samples of each class (`shots=-1`: keep all). A class with fewer than `shots` samples
       there raises DataError.
    3. Fit `LogisticRegression(C=C, max_iter=1000)` on those samples for every C of REGULARISATION_GRID and
       keep the C with the best validation accuracy (the smallest C on ties). With `val_fraction=0` there
       is no sweep and C is 1.0.
    4. Refit with that C: on the few-shot samples alone when `shots > 0`, so the probe sees exactly
       `shots` per class, and on those plus the validation part when `shots == -1`.
    5. Score on the test split.

    Differences from CLIP_benchmark: it trains a linear layer with AdamW and sweeps weight decay, and splits
    off the validation part at random; this follows the CLIP paper (scikit-learn's L-BFGS logistic
    regression, a sweep over C) and stratifies the split so every class is validated.

    Returns {"acc1", "acc5" (top-min(5, classes fitted)), "mean_per_class_recall" (balanced accuracy),
    "regularisation" (the chosen C), "shots", "samples_fit", "samples_val", "samples_scored"}.
    """
    _check_arguments(shots, val_fraction)
    pool, val = _validation_split(train_features.double().numpy(), train_labels.numpy(), val_fraction, seed)
    chosen = select_fewshot(pool[1], shots, seed)
    fit = (pool[0][chosen], pool[1][chosen])
    regularisation = sweep_regularisation(fit, val) if len(val[1]) else NO_SWEEP_REGULARISATION
    if shots == -1 and len(val[1]):
        fit = (np.concatenate([fit[0], val[0]]), np.concatenate([fit[1], val[1]]))
    probe = _fit(fit, regularisation)
    metrics = _score(probe, (test_features.double().numpy(), test_labels.numpy()))
    return {
        **metrics,
        "regularisation": regularisation,
        "shots": shots,
        "samples_fit": len(fit[1]),
        "samples_val": len(val[1]),
        "samples_scored": len(test_labels),
    }


def _check_arguments(shots: int, val_fraction: float) -> None:
    if shots == 0 or shots < -1:
        raise ValueError(f"shots must be a positive number of samples per class, or -1 for all; got {shots}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")


def _validation_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> Tuple[Split, Split]:
    """(the part the few-shot samples are drawn from, the validation part); the latter empty at 0."""
    if val_fraction == 0:
        return (x, y), (x[:0], y[:0])
    try:
        x_pool, x_val, y_pool, y_val = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    except ValueError as e:  # too few samples of a class, or of all, to give every class a share of both
        raise DataError(
            f"cannot hold out a stratified validation part of {val_fraction} of the train split: {e}"
        ) from e
    return (x_pool, y_pool), (x_val, y_val)


def select_fewshot(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of the first `shots` samples of each class along a seeded permutation, in permutation order
    (all of them, permuted, when shots is -1). Raises DataError if a class has fewer than `shots`."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if shots == -1:
        return order
    classes, counts = np.unique(labels, return_counts=True)
    short = counts < shots
    if short.any():
        c, n = classes[short][0], counts[short][0]
        raise DataError(f"class {c} has {n} training samples (after the validation hold-out), fewer than {shots} shots")
    walked = labels[order]
    # Rank of each sample within its class along the walk: its position among the class's samples, found by
    # a stable sort on the label (which keeps walk order inside a class).
    by_class = np.argsort(walked, kind="stable")
    class_start = np.searchsorted(walked[by_class], walked[by_class], side="left")
    rank = np.empty(len(walked), dtype=np.int64)
    rank[by_class] = np.arange(len(walked)) - class_start
    return order[rank < shots]


def sweep_regularisation(fit: Split, val: Split) -> float:
    """The C of REGULARISATION_GRID whose probe, fitted on `fit`, is most accurate on `val` (smallest on ties).

    Each C gets an independent fit from zero. Warm-starting from the previous C was tried and dropped: L-BFGS
    stops at a tolerance, not at the optimum, so a warm start lands elsewhere and moved the chosen C in 8 of
    64 trial sweeps; running the fits in threads gained nothing, BLAS already using the cores."""
    best, best_accuracy = NO_SWEEP_REGULARISATION, -1.0
    with warnings.catch_warnings():
        # The weakly regularised end of the grid on separable few-shot data is expected to hit the iteration
        # cap; only the chosen C is refitted, and its warning stays visible there.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for regularisation in REGULARISATION_GRID:
            accuracy = _fit(fit, float(regularisation)).score(*val)
            if accuracy > best_accuracy:  # strict: ties keep the smaller C, the stronger regularisation
                best, best_accuracy = float(regularisation), accuracy
    return best


def _fit(data: Split, regularisation: float) -> LogisticRegression:
    if len(np.unique(data[1])) < 2:
        raise DataError(f"a linear probe needs samples of at least 2 classes; got {len(np.unique(data[1]))}")
    return LogisticRegression(C=regularisation, max_iter=MAX_ITER).fit(*data)


def _score(probe: LogisticRegression, test: Split) -> Dict[str, float]:
    """acc1, acc5 and mean per-class recall; predictions are probe class ids (`classes_`), which may leave
    out a class the probe never saw: its test samples then count as misses."""
    x, y = test
    proba = probe.predict_proba(x)  # (N, len(classes_)), columns in classes_ order
    k = min(5, len(probe.classes_))
    top = probe.classes_[np.argsort(-proba, axis=1, kind="stable")[:, :k]]  # (N, k) label ids, best first
    predicted = top[:, 0]
    return {
        "acc1": float((predicted == y).mean()),
        "acc5": float((top == y[:, None]).any(axis=1).mean()),
        "mean_per_class_recall": float(balanced_accuracy_score(y, predicted)),
    }
