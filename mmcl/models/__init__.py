"""Towers (by registry) and the N-tower encoder."""

from mmcl.models.multi_encoder import MultiEncoder
from mmcl.models.towers import TOWERS, Tower

__all__ = ["MultiEncoder", "TOWERS", "Tower"]
