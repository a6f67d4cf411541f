"""Checkpoint conversion as data: declarative key tables between mmcl and other layouts.

open_clip's CLIP keeps the vision tower under `visual.` and the text tower's parts at the top level;
mmcl's image/text towers wrap exactly those modules, so the mapping is a table of prefixes plus the
logit scale/bias, which open_clip stores as 0-dim tensors and mmcl as (1,).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import open_clip
import torch
from open_clip.factory import load_state_dict
from safetensors.torch import save_file

from mmcl import config as config_lib
from mmcl.checkpoint.state import DEEPSPEED_TAG
from mmcl.config import Config
from mmcl.errors import CheckpointError, ConfigError
from mmcl.models import MultiEncoder
from mmcl.models.towers import OpenClipTextTower, OpenClipVisionTower

# (mmcl prefix, open_clip prefix): a key starting with the left prefix maps to the right one.
OPEN_CLIP_PREFIXES: List[Tuple[str, str]] = [
    ("towers.image.encoder.", "visual."),
    ("towers.text.encoder.", ""),
    ("similarity.logit_scale", "logit_scale"),
    ("similarity.logit_bias", "logit_bias"),
]
OPEN_CLIP_TOWERS = {"image": "open_clip_vision", "text": "open_clip_text"}
SCALARS = {"logit_scale", "logit_bias"}  # 0-dim in open_clip


def check_open_clip_compatible(cfg: Config) -> None:
    towers = {m: t.type for m, t in cfg.model.towers.items()}
    if towers != OPEN_CLIP_TOWERS:
        raise ConfigError(
            f"open_clip's CLIP holds exactly an open_clip image and text tower; this model has "
            f"{towers}: the parts {sorted(set(towers.items()) ^ set(OPEN_CLIP_TOWERS.items()))} "
            "cannot be expressed"
        )


def _rename(key: str, table: List[Tuple[str, str]]) -> str:
    for source, target in table:
        if key.startswith(source):
            return target + key[len(source) :]
    raise CheckpointError(f"no mapping for parameter {key!r}: not an mmcl image-text or open_clip CLIP checkpoint")


def to_open_clip_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = _rename(key, OPEN_CLIP_PREFIXES)
        out[name] = value.reshape(()) if name in SCALARS else value
    return out


def from_open_clip_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    reverse = sorted(((target, source) for source, target in OPEN_CLIP_PREFIXES), key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        if key == "attn_mask":  # a buffer open_clip may save; mmcl rebuilds it
            continue
        name = _rename(key, reverse)
        out[name] = value.reshape(1) if key in SCALARS else value
    return out


def _tower_settings(tower_class: Any, cfg: Config, modality: str) -> Dict[str, Any]:
    # Unset (None) settings are left out: open_clip fills its own defaults for them.
    values = dataclasses.asdict(tower_class.settings(cfg.model.towers[modality]))
    return {k: v for k, v in values.items() if v is not None}


def open_clip_model_config(cfg: Config) -> Dict[str, Any]:
    """The open_clip model config (what its JSON model configs hold) of an mmcl image-text model."""
    check_open_clip_compatible(cfg)
    vision = _tower_settings(OpenClipVisionTower, cfg, "image")
    text = _tower_settings(OpenClipTextTower, cfg, "text")
    quick_gelu = {vision.pop("quick_gelu"), text.pop("quick_gelu")}  # one model-level flag in open_clip
    if len(quick_gelu) > 1:
        raise ConfigError(
            "config key 'model.towers.text.options.quick_gelu': open_clip's CLIP uses one activation "
            "for both towers; these differ"
        )
    model_cfg: Dict[str, Any] = {
        "embed_dim": cfg.model.embed_dim,
        "quick_gelu": quick_gelu.pop(),
        "vision_cfg": vision,
        "text_cfg": text,
    }
    if cfg.model.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.model.init_logit_bias
    return model_cfg


def export_open_clip(state: Dict[str, torch.Tensor], cfg: Config, out_dir: Path, name: str) -> Tuple[Path, Path]:
    """Writes <name>.json (an open_clip model config) and <name>.safetensors into out_dir.

    Load with: open_clip.add_model_config(out_dir); open_clip.create_model(name, pretrained=weights).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    config_path.write_text(json.dumps(open_clip_model_config(cfg), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in to_open_clip_state(state).items()}, weights_path)
    return config_path, weights_path


def consolidate_zero(checkpoint: Path, out_file: Path) -> Path:
    """One fp32 safetensors file from DeepSpeed's sharded ZeRO state (any stage, any world size),
    by DeepSpeed's own consolidation."""
    # Imported here: DeepSpeed's import takes seconds and only this conversion needs it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    save_file({k: v.float().contiguous() for k, v in state.items()}, out_file)
    return Path(out_file)


def open_clip_config(architecture: str, logit_bias: bool) -> Config:
    """The mmcl config of an open_clip architecture (a model config name), with a logit bias or not."""
    model_cfg = open_clip.get_model_config(architecture)
    if model_cfg is None:
        raise ConfigError(f"unknown open_clip architecture {architecture!r}; see open_clip.list_models()")
    cfg = config_lib.load(
        None,
        [
            "data.train=unused",
            f"run.name={architecture}",
            f"model.embed_dim={model_cfg['embed_dim']}",
            "model.towers.image.type=open_clip_vision",
            f"model.towers.image.preset={architecture}",
            "model.towers.text.type=open_clip_text",
            f"model.towers.text.preset={architecture}",
            *(["model.init_logit_bias=0.0"] if logit_bias else []),
        ],
    )
    check_open_clip_compatible(cfg)
    return cfg


def open_clip_as_mmcl(architecture: str, checkpoint_file: str | Path) -> Tuple[MultiEncoder, Config]:
    """An open_clip architecture (a model config name) with a local checkpoint file, as an mmcl image-text
    model and the config that builds it, so mmcl evaluates (or fine-tunes) it like its own models."""
    state = load_state_dict(str(checkpoint_file), weights_only=True)  # never unpickles arbitrary objects
    cfg = open_clip_config(architecture, logit_bias="logit_bias" in state)
    model = MultiEncoder(cfg.model)
    weights = from_open_clip_state(state)
    own = model.state_dict()
    differ = sorted(set(own) ^ set(weights)) + [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if differ:
        raise CheckpointError(
            f"{checkpoint_file} does not hold a {architecture} model: {len(differ)} parameters "
            f"are missing, extra or of another shape, e.g. {differ[:3]}"
        )
    model.load_state_dict(weights)
    return model, cfg
