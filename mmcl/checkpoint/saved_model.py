"""A trained model named by a path, in any form mmcl reads: an mmcl run or checkpoint directory, a
Hugging Face CLIPModel directory, or an open_clip checkpoint file with its architecture (`ARCH=FILE`).

Naming and loading are apart: `saved_model` finds the model and reads its config without loading any
weight (so a caller can check it before any compute), `load_saved_model` builds it. `mmcl eval` and
distillation's teacher (`loss.distill_from`) both read models this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import open_clip
import torch

from mmcl import config as config_lib
from mmcl.checkpoint import convert
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.hf_clip import hf_clip_config, import_hf_clip
from mmcl.config import Config
from mmcl.errors import ConfigError
from mmcl.models import MultiEncoder, load_model


@dataclass(frozen=True)
class SavedModel:
    """A model found on disk, its weights not loaded yet."""

    name: str
    path: Path  # the checkpoint directory, CLIPModel directory or checkpoint file
    architecture: str = ""  # an open_clip file's architecture; "" otherwise
    cfg: Optional[Config] = None  # the config that builds it (None for an open_clip file: see `config_of`)
    hf_clip: bool = False  # a Hugging Face CLIPModel directory
    ema: bool = False  # an mmcl checkpoint's EMA weights (ema.safetensors) rather than its trained weights


def parse_spec(spec: str) -> Tuple[str, Path]:
    """'ARCH=FILE' -> (ARCH, FILE) for an open_clip file, anything else -> ("", path); a spec that names a
    directory as a whole is a directory (a run's name may hold "=")."""
    architecture, sep, file = spec.partition("=")
    if sep and architecture and not Path(spec).is_dir():
        return architecture, Path(file)
    return "", Path(spec)


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, a run directory's latest checkpoint, or its best (RUN/best)."""
    pointed = checkpoints.from_pointer(path)
    if pointed is not None:
        return pointed
    if (path / "checkpoints").exists():
        latest = checkpoints.latest(path)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
        return latest
    return path


def saved_model(architecture: str, given: Path) -> SavedModel:
    """The model at `given` (an open_clip file when `architecture` is set), its config read, no weights."""
    if architecture:
        if not given.is_file():
            raise FileNotFoundError(f"open_clip checkpoint file {given} (for {architecture}) not found")
        if open_clip.get_model_config(architecture) is None:
            raise ConfigError(f"unknown open_clip architecture {architecture!r}; see open_clip.list_models()")
        return SavedModel(architecture, given, architecture)
    if (given / "config.json").is_file() and not (given / "config.yaml").is_file():
        cfg = hf_clip_config(given)
        return SavedModel(cfg.run.name, given, cfg=cfg, hf_clip=True)
    path = checkpoint_dir(given)
    cfg = config_lib.from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
    return SavedModel(cfg.run.name, path, cfg=cfg)


def config_of(model: SavedModel) -> Config:
    """The config that builds the model (an open_clip file's from its architecture, as when it is loaded)."""
    if model.cfg is not None:
        return model.cfg
    return convert.open_clip_config(model.architecture, logit_bias=False)


def load_saved_model(model: SavedModel, device: torch.device) -> Tuple[MultiEncoder, Config]:
    """The model on `device` in evaluation mode, and the config whose data and eval settings apply."""
    if model.architecture:
        network, cfg = convert.open_clip_as_mmcl(model.architecture, model.path)
        return network.to(device).eval(), cfg
    if model.hf_clip:
        weights, cfg = import_hf_clip(model.path)
        return load_model(cfg.model, weights, device), cfg
    assert model.cfg is not None  # an mmcl checkpoint always carries its config
    return load_model(model.cfg.model, checkpoints.load_weights(model.path, model.ema), device), model.cfg
