"""Symmetric InfoNCE (CLIP; with same-modality negatives, SimCLR's NT-Xent) and the decoupled
contrastive loss (DCL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses.base import RowwiseLoss, only, positive_logits
from mmcl.losses.registry import LOSSES


def infonce_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Single-process CLIP loss: mean of the a->b and b->a cross-entropies over the full batch.

    a, b: (B, D) unit-norm, row i of each paired; `logit_scale` is the multiplier, as open_clip's ClipLoss takes it.
    """
    logits = logit_scale * a @ b.T  # (B, D) x (D, B) -> (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    ) / 2


@LOSSES.register("infonce")
class InfoNCE(RowwiseLoss):
    same_modality_negatives = True

    @classmethod
    def check_settings(cls, cfg: LossConfig, key: str) -> None:
        super().check_settings(cfg, key)
        if cfg.same_modality_negatives and cfg.label_smoothing:
            raise ConfigError(f"config key '{key}.label_smoothing': not defined with same_modality_negatives")

    def row_losses(self, logits, positive, negatives, logit_scale):
        if self.cfg.same_modality_negatives:  # the anchor's own column drops out of the softmax
            logits = only(logits, negatives.scatter(1, positive[:, None], True))
        return F.cross_entropy(logits, positive, reduction="none", label_smoothing=self.cfg.label_smoothing)


@LOSSES.register("dcl")
class DecoupledContrastive(RowwiseLoss):
    """DCL (Yeh et al., 2022): InfoNCE with the positive removed from the denominator, which removes
    the coupling that shrinks the gradient when the positive is already easy."""

    same_modality_negatives = True

    def row_losses(self, logits, positive, negatives, logit_scale):
        return only(logits, negatives).logsumexp(dim=1) - positive_logits(logits, positive)
