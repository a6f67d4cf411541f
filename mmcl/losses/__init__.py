"""Contrastive losses, built by name from the loss config (see base.py for the shared call shape)."""

from mmcl.config import LossConfig
from mmcl.losses import hard_negative, multimodal, multiview, siglip, tiled  # noqa: F401  (registration)
from mmcl.losses.base import ContrastiveLoss
from mmcl.losses.infonce import infonce_loss
from mmcl.losses.registry import LOSSES
from mmcl.losses.siglip import siglip_loss


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    return LOSSES.get(cfg.name)(cfg)


__all__ = ["LOSSES", "ContrastiveLoss", "build_loss", "infonce_loss", "siglip_loss"]
