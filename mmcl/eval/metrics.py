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
    query_emb: torch.Tensor, gallery_emb: torch.Tensor, ks: Sequence[int], matches: Optional[torch.Tensor] = None
) -> Dict[int, float]:
    """Fraction of queries with a match within the top k of the gallery. `matches` (Nq, Ng) marks each
    query's matches (several: an image's captions, or every item of its class); default: its own row.

    Ties are broken at random, in expectation: with `a` non-matches scoring above the query's best
    match, and `t` non-matches and `m` matches tying with it, the tied items come in random order after
    the `a`, so the query misses its top k with probability C(t, j) / C(t + m, j), j = k - a slots left.
    (Counting ties as wins would reward duplicate captions.)"""
    scores = query_emb @ gallery_emb.T  # (Nq, D) x (D, Ng) -> (Nq, Ng)
    if matches is None:
        matches = torch.eye(len(scores), dtype=torch.bool)
    best_match = scores.masked_fill(~matches, float("-inf")).max(dim=1, keepdim=True).values  # (Nq, 1)
    ahead = ((scores > best_match) & ~matches).sum(dim=1).double()  # (Nq,)
    tied = ((scores == best_match) & ~matches).sum(dim=1).double()  # (Nq,)
    tied_matches = ((scores == best_match) & matches).sum(dim=1).double()  # (Nq,) >= 1
    recalls = {}
    for k in ks:
        slots = (k - ahead).clamp(min=0)  # (Nq,) places left in the top k for the tied group
        picked = torch.minimum(slots, tied + tied_matches)
        # log C(t, j) - log C(t + m, j): the chance that the first j of the tied group are all non-matches
        all_miss = _log_choose(tied, picked) - _log_choose(tied + tied_matches, picked)
        hit = torch.where(picked > tied, 1.0, 1.0 - all_miss.exp())  # more slots than tied non-matches: a hit
        recalls[k] = hit.mean().item()
    return recalls


def _log_choose(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log C(n, k) for 0 <= k <= n, elementwise."""
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted (top-1) class."""
    predicted = logits.argmax(dim=1)
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
