"""Contrastive losses, built by name from the loss config (see base.py for the shared call shape)."""

from typing import Sequence

from mmcl.config import LossConfig
from mmcl.losses import hard_negative, infonce, multimodal, multiview, siglip, tiled  # noqa: F401  (registration)
from mmcl.losses.base import ContrastiveLoss, PairInputs
from mmcl.losses.infonce import infonce_loss
from mmcl.losses.registry import LOSSES


def check_loss_config(
    cfg: LossConfig, modalities: Sequence[str], optional: Sequence[str] = (), key: str = "loss"
) -> None:
    """A ConfigError naming the key for a loss that cannot be built or cannot train these towers."""
    LOSSES.check(cfg.name, f"{key}.name")
    LOSSES.get(cfg.name).check(cfg, modalities, optional, key)


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    return LOSSES.get(cfg.name)(cfg)


__all__ = ["LOSSES", "ContrastiveLoss", "PairInputs", "build_loss", "check_loss_config", "infonce_loss"]
