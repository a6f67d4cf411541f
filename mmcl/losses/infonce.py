"""Symmetric InfoNCE (CLIP): cross-entropy over scaled cosine similarities, in both directions."""

from __future__ import annotations

from itertools import combinations
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import LossConfig
from mmcl.losses.registry import LOSSES


def infonce_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of the a->b and b->a cross-entropies; a and b are (B, D) unit-norm, row i of each paired.

    `logit_scale` is the multiplier itself (exp of the learnt log-scale), as open_clip's ClipLoss takes it.
    """
    logits = logit_scale * a @ b.T  # (B, D) x (D, B) -> (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


@LOSSES.register("infonce")
class InfoNCE(nn.Module):
    """InfoNCE over every pair of the modalities present, averaged; parts are reported per pair."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing

    def forward(self, embeddings: Mapping[str, torch.Tensor], logit_scale: torch.Tensor) -> Dict[str, torch.Tensor]:
        pairs = list(combinations(sorted(embeddings), 2))
        if not pairs:
            raise ValueError(f"InfoNCE needs two modalities, got {sorted(embeddings)}")
        parts = {f"{a}_{b}": infonce_loss(embeddings[a], embeddings[b], logit_scale, self.label_smoothing)
                 for a, b in pairs}
        return {"loss": torch.stack(list(parts.values())).mean(), **parts}
