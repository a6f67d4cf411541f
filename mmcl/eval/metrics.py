"""Metric arithmetic over embeddings and logits: classification accuracy and retrieval recall@k."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Dict[str, float]:
    """acc1, acc5 (top-C when fewer classes) and mean per-class recall of (N, C) logits, by
    CLIP_benchmark's names."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    hits = topk == labels[:, None]  # (N, k)
    top1 = hits[:, 0].float()
    recalls = [top1[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": top1.mean().item(),
        "acc5": hits.any(dim=1).float().mean().item(),
        "mean_per_class_recall": sum(recalls) / len(recalls),
    }


def recall_at_k(
    query_emb: torch.Tensor, gallery_emb: torch.Tensor, ks: Sequence[int], labels: Optional[torch.Tensor] = None
) -> Dict[int, float]:
    """Fraction of queries with a match within the top k of the gallery. A match is the query's own
    pair (same row index), or, given `labels` (N,), any gallery item of the query's label.

    Ties are broken at random, in expectation: with `a` non-matches scoring above the best match and
    `t` scoring the same, the match lands at each of ranks a..a+t alike, so the hit probability is
    clamp((k - a) / (t + 1), 0, 1). (Counting ties as wins would reward duplicate captions.)"""
    scores = query_emb @ gallery_emb.T  # (N, D) x (D, N) -> (N, N)
    if labels is None:
        matches = torch.eye(len(scores), dtype=torch.bool)
    else:
        matches = labels[:, None] == labels[None, :]  # (N, N)
    best_match = scores.masked_fill(~matches, float("-inf")).max(dim=1, keepdim=True).values  # (N, 1)
    ahead = ((scores > best_match) & ~matches).sum(dim=1).float()  # (N,)
    tied = ((scores == best_match) & ~matches).sum(dim=1).float()  # (N,)
    return {k: ((k - ahead) / (tied + 1)).clamp(0, 1).mean().item() for k in ks}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted (top-1) class."""
    predicted = logits.argmax(dim=1)
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
