"""Towers (by registry) and the N-tower encoder."""

from mmcl.models import audio  # noqa: F401  (registers the audio tower)
from mmcl.models.multi_encoder import Encoded, MultiEncoder, check_model_config, load_model
from mmcl.models.towers import TOWERS, Tower

__all__ = ["TOWERS", "Encoded", "MultiEncoder", "Tower", "check_model_config", "load_model"]
