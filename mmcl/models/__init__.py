"""Towers (by registry) and the N-tower encoder."""

from mmcl.models import audio  # noqa: F401  (registers the audio tower)
from mmcl.models.multi_encoder import MultiEncoder
from mmcl.models.towers import TOWERS, Tower

__all__ = ["MultiEncoder", "TOWERS", "Tower"]
