"""Contrastive losses, built by name from the loss config."""

from mmcl.config import LossConfig
from mmcl.losses.infonce import InfoNCE, infonce_loss
from mmcl.losses.registry import LOSSES


def build_loss(cfg: LossConfig):
    return LOSSES.get(cfg.name)(cfg)


__all__ = ["LOSSES", "InfoNCE", "build_loss", "infonce_loss"]
