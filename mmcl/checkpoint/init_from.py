"""`model.init_from`: a fresh run's first weights from an mmcl checkpoint (or a run directory: its latest
checkpoint), a Hugging Face CLIPModel directory or an open_clip checkpoint file, told apart by what the
path holds."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from open_clip.factory import load_state_dict
from safetensors.torch import load_file

from mmcl.checkpoint.convert import from_open_clip_state
from mmcl.checkpoint.hf_clip import import_hf_clip
from mmcl.checkpoint.state import WEIGHTS_FILE, latest
from mmcl.errors import ConfigError


def initial_weights(path: str | Path) -> Dict[str, torch.Tensor]:
    """mmcl-named weights from any of the three formats."""
    path = Path(path)
    if not path.is_file() and latest(path) is not None:  # a run directory
        path = latest(path)  # type: ignore[assignment]
    if (path / "config.json").is_file():
        return import_hf_clip(path)[0]
    if (path / WEIGHTS_FILE).is_file():
        return load_file(path / WEIGHTS_FILE)
    if path.is_file():
        return from_open_clip_state(load_state_dict(str(path), weights_only=True))
    raise FileNotFoundError(f"{path}: neither an mmcl checkpoint, a CLIPModel directory nor a checkpoint file")


def load_initial_weights(model: torch.nn.Module, path: str | Path) -> List[str]:
    """Copy the weights at `path` into `model`; returns the parameters it lacks (towers that start
    fresh). Weights the model has no place for, or of another shape, are a ConfigError."""
    weights = initial_weights(path)
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    wrong_shape = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if unexpected or wrong_shape:
        raise ConfigError(
            f"config key 'model.init_from': {path} does not fit the configured model: "
            f"no place for {unexpected[:5]}, other shapes for {wrong_shape[:5]}"
        )
    model.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))
