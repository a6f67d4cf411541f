"""Symmetric InfoNCE (CLIP) and the decoupled contrastive loss (DCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.losses.base import RowwiseLoss, positive_logits, without_positive
from mmcl.losses.registry import LOSSES


def infonce_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Single-process CLIP loss: mean of the a->b and b->a cross-entropies over the full batch.

    a, b: (B, D) unit-norm, row i of each paired; `logit_scale` is the multiplier, as open_clip's ClipLoss takes it.
    """
    logits = logit_scale * a @ b.T  # (B, D) x (D, B) -> (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


@LOSSES.register("infonce")
class InfoNCE(RowwiseLoss):
    def row_losses(self, anchors, candidates, logit_scale, positive):
        logits = logit_scale * anchors @ candidates.T  # (R, D) x (D, C) -> (R, C)
        return F.cross_entropy(logits, positive, reduction="none", label_smoothing=self.cfg.label_smoothing)


@LOSSES.register("dcl")
class DecoupledContrastive(RowwiseLoss):
    """DCL (Yeh et al., 2022): InfoNCE with the positive removed from the denominator, which removes
    the coupling that shrinks the gradient when the positive is already easy."""

    def row_losses(self, anchors, candidates, logit_scale, positive):
        logits = logit_scale * anchors @ candidates.T  # (R, C)
        return without_positive(logits, positive).logsumexp(dim=1) - positive_logits(logits, positive)
