"""The few-shot linear probe: equal to a slow reference transcribed from its documented algorithm, selecting
exactly k samples per class, seeded, and sane at the extremes (separable features, pure noise)."""

from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from mmcl.errors import DataError
from mmcl.eval.linear_probe import fewshot_probe, select_fewshot

CLASSES, DIM = 10, 32


def clusters(n: int, spread: float, seed: int, classes: int = CLASSES) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, DIM) Gaussian clusters around random unit-scale centres, labels balanced and shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, DIM, generator=g)
    labels = torch.randperm(n, generator=g) % classes
    return centres[labels] + spread * torch.randn(n, DIM, generator=g), labels


def train_and_test(n_train: int, n_test: int, spread: float, seed: int) -> Tuple[torch.Tensor, ...]:
    """Train and test splits drawn around the same centres."""
    x, y = clusters(n_train + n_test, spread, seed)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# --- The slow reference: the docstring's steps with plain loops, sharing nothing with the module under test
# but scikit-learn's LogisticRegression and train_test_split.


def reference_fewshot_indices(labels: np.ndarray, shots: int, seed: int) -> List[int]:
    counts: Dict[int, int] = {}
    kept = []
    for p in np.random.default_rng(seed).permutation(len(labels)):
        c = int(labels[p])
        counts.setdefault(c, 0)
        if shots == -1 or counts[c] < shots:
            counts[c] += 1
            kept.append(int(p))
    return kept


def reference_accuracy(predicted: List[int], truth: List[int]) -> float:
    hits = 0
    for p, t in zip(predicted, truth, strict=True):
        if p == t:
            hits += 1
    return hits / len(truth)


def reference_scores(probe: LogisticRegression, x: np.ndarray, y: np.ndarray) -> Dict[str, float]:
    proba = probe.predict_proba(x)
    classes = [int(c) for c in probe.classes_]
    top1, top5_hits = [], 0
    for row, truth in zip(proba, y, strict=True):
        ranked = sorted(range(len(classes)), key=lambda j: -row[j])  # stable: ties keep the lower column
        ranked_labels = [classes[j] for j in ranked]
        top1.append(ranked_labels[0])
        if int(truth) in ranked_labels[: min(5, len(classes))]:
            top5_hits += 1
    seen: Dict[int, int] = {}
    right: Dict[int, int] = {}
    for p, t in zip(top1, y, strict=True):
        seen[int(t)] = seen.get(int(t), 0) + 1
        right[int(t)] = right.get(int(t), 0) + (p == int(t))
    recalls = [right[c] / seen[c] for c in seen]
    return {
        "acc1": reference_accuracy(top1, [int(t) for t in y]),
        "acc5": top5_hits / len(y),
        "mean_per_class_recall": sum(recalls) / len(recalls),
    }


def reference_probe(train_x, train_y, test_x, test_y, shots: int, val_fraction: float, seed: int) -> Dict:
    x, y = train_x.double().numpy(), train_y.numpy()
    x_pool, x_val, y_pool, y_val = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    kept = reference_fewshot_indices(y_pool, shots, seed)
    x_fit, y_fit = x_pool[kept], y_pool[kept]
    best_c, best_accuracy = None, -1.0
    for c in np.logspace(-6, 6, 25):
        probe = LogisticRegression(C=c, max_iter=1000).fit(x_fit, y_fit)
        accuracy = reference_accuracy([int(p) for p in probe.predict(x_val)], [int(t) for t in y_val])
        if accuracy > best_accuracy:
            best_c, best_accuracy = float(c), accuracy
    if shots == -1:
        x_fit, y_fit = np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val])
    probe = LogisticRegression(C=best_c, max_iter=1000).fit(x_fit, y_fit)
    return {**reference_scores(probe, test_x.double().numpy(), test_y.numpy()), "regularisation": best_c}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the reference's weak-C fits
@pytest.mark.parametrize("shots", [1, 4, -1])
def test_fewshot_probe_equals_the_slow_reference(shots):
    # Overlapping clusters (spread 1.5 around unit-scale centres): accuracy well between chance and 100%.
    data = train_and_test(400, 500, spread=1.5, seed=0)
    fast = fewshot_probe(*data, shots=shots, val_fraction=0.2, seed=3)
    slow = reference_probe(*data, shots=shots, val_fraction=0.2, seed=3)
    assert fast["regularisation"] == slow["regularisation"]
    assert fast["acc1"] == slow["acc1"] and fast["acc5"] == slow["acc5"]
    assert fast["mean_per_class_recall"] == pytest.approx(slow["mean_per_class_recall"], abs=1e-12)
    assert 0.2 < fast["acc1"] < 0.95 and fast["acc1"] <= fast["acc5"] < 1
    expected_fit = 320 + 80 if shots == -1 else shots * CLASSES  # the val part rejoins only when shots is -1
    assert (fast["samples_fit"], fast["samples_val"], fast["samples_scored"]) == (expected_fit, 80, 500)


def test_the_selection_holds_exactly_shots_per_class_and_follows_the_seed():
    labels = (torch.randperm(300, generator=torch.Generator().manual_seed(1)) % CLASSES).numpy()
    chosen = {seed: select_fewshot(labels, 4, seed) for seed in (0, 1)}
    for indices in chosen.values():
        assert np.bincount(labels[indices], minlength=CLASSES).tolist() == [4] * CLASSES
        assert len(set(indices.tolist())) == len(indices)
    assert set(chosen[0].tolist()) != set(chosen[1].tolist())
    assert np.array_equal(select_fewshot(labels, 4, 0), chosen[0])
    assert sorted(select_fewshot(labels, -1, 0).tolist()) == list(range(300))

    data = train_and_test(300, 200, spread=1.5, seed=1)
    result = fewshot_probe(*data, shots=4, seed=0)
    assert result["samples_fit"] == 4 * CLASSES and result["shots"] == 4
    assert fewshot_probe(*data, shots=4, seed=0) == result


def test_too_few_samples_for_the_shots_names_the_class():
    x, y = clusters(200, spread=1.0, seed=2)
    keep = (y != 3) | (torch.cumsum(y == 3, 0) <= 6)  # class 3 keeps 6 samples, about 5 after validation
    with pytest.raises(DataError, match=r"class 3 has [1-6] .*fewer than 8 shots"):
        fewshot_probe(x[keep], y[keep], x, y, shots=8, seed=0)


def test_separable_features_score_near_one_and_noise_near_chance():
    data = train_and_test(400, 1000, spread=0.05, seed=4)
    separable = fewshot_probe(*data, shots=16, seed=0)
    assert separable["acc1"] >= 0.98 and separable["mean_per_class_recall"] >= 0.98 and separable["acc5"] == 1

    g = torch.Generator().manual_seed(5)
    noise = [torch.randn(n, DIM, generator=g) for n in (400, 2000)]
    labels = [torch.randint(0, CLASSES, (n,), generator=g) for n in (400, 2000)]
    chance = fewshot_probe(noise[0], labels[0], noise[1], labels[1], shots=16, seed=0)
    assert abs(chance["acc1"] - 1 / CLASSES) < 0.04  # 2000 test samples: one standard deviation is 0.007
    assert abs(chance["acc5"] - 5 / CLASSES) < 0.06


def test_labels_map_through_the_classes_the_probe_saw():
    # Train on classes 2, 5 and 7 only (ids that are not 0..2); the test split holds all ten classes.
    x, y = clusters(600, spread=0.05, seed=6)
    seen = (y == 2) | (y == 5) | (y == 7)
    result = fewshot_probe(x[seen], y[seen], x, y, shots=8, seed=0)
    in_test = [int(((y == c).sum())) for c in range(CLASSES)]
    assert result["acc1"] == pytest.approx((in_test[2] + in_test[5] + in_test[7]) / 600)
    assert result["acc5"] == result["acc1"]  # top-3 of 3 classes: a hit exactly when the class was seen
    assert result["mean_per_class_recall"] == pytest.approx(3 / CLASSES)


def test_no_validation_part_means_no_sweep():
    data = train_and_test(200, 100, spread=1.0, seed=7)
    result = fewshot_probe(*data, shots=-1, val_fraction=0)
    assert result["regularisation"] == 1.0 and result["samples_val"] == 0 and result["samples_fit"] == 200


@pytest.mark.parametrize("shots, val_fraction", [(0, 0.2), (-2, 0.2), (4, 1.0), (4, -0.1)])
def test_bad_arguments_are_value_errors(shots, val_fraction):
    x, y = clusters(100, spread=1.0, seed=8)
    with pytest.raises(ValueError, match="shots" if shots in (0, -2) else "val_fraction"):
        fewshot_probe(x, y, x, y, shots=shots, val_fraction=val_fraction)
