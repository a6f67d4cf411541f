"""Linear probe: a logistic-regression classifier (scikit-learn) on frozen embeddings.

The evaluation set is split in two, stratified by class and seeded: the probe is fitted on one half
and scored on the other, so no extra labelled training split is needed.
"""

from __future__ import annotations

from typing import Dict

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split


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
