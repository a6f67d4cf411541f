"""Checkpoint conversion as data: declarative key tables between mmcl and other layouts.

open_clip's CLIP keeps the vision tower under `visual.` and the text tower's parts at the top level;
mmcl's image/text towers wrap exactly those modules, so the mapping is a table of prefixes plus the
logit scale/bias, which open_clip stores as 0-dim tensors and mmcl as (1,).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file

from mmcl.config import Config, ConfigError

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
        raise ConfigError(f"open_clip's CLIP holds exactly an open_clip image and text tower; this model has "
                          f"{towers}: the parts {sorted(set(towers.items()) ^ set(OPEN_CLIP_TOWERS.items()))} "
                          "cannot be expressed")


def _rename(key: str, table: List[Tuple[str, str]]) -> str:
    for source, target in table:
        if key.startswith(source):
            return target + key[len(source):]
    raise KeyError(f"no mapping for parameter {key!r}")


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


def open_clip_model_config(cfg: Config) -> Dict[str, object]:
    """The open_clip model config (what its JSON model configs hold) of an mmcl image-text model."""
    from mmcl.models.towers import OpenClipTextTower, OpenClipVisionTower

    check_open_clip_compatible(cfg)
    def settings(tower_class, modality: str) -> Dict[str, object]:
        # Unset (None) settings are left out: open_clip fills its own defaults for them.
        values = dataclasses.asdict(tower_class.settings(cfg.model.towers[modality]))
        return {k: v for k, v in values.items() if v is not None}

    model_cfg: Dict[str, object] = {
        "embed_dim": cfg.model.embed_dim,
        "vision_cfg": settings(OpenClipVisionTower, "image"),
        "text_cfg": settings(OpenClipTextTower, "text"),
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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmcl.train.engine import DeepSpeedEngine

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DeepSpeedEngine.TAG)
    save_file({k: v.float().contiguous() for k, v in state.items()}, out_file)
    return Path(out_file)


def open_clip_as_mmcl(architecture: str, checkpoint_file: str | Path) -> Tuple[torch.nn.Module, Config]:
    """An open_clip architecture (a model config name) with a local checkpoint file, as an mmcl image-text
    model and the config that builds it, so mmcl evaluates (or fine-tunes) it like its own models."""
    import open_clip
    from open_clip.factory import load_state_dict

    from mmcl import config as config_lib
    from mmcl.models import MultiEncoder

    model_cfg = open_clip.get_model_config(architecture)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {architecture!r}; see open_clip.list_models()")
    state = load_state_dict(str(checkpoint_file), weights_only=True)  # never unpickles arbitrary objects
    cfg = config_lib.load(None, [
        "data.train=unused", f"run.name={architecture}", f"model.embed_dim={model_cfg['embed_dim']}",
        "model.towers.image.type=open_clip_vision", f"model.towers.image.preset={architecture}",
        "model.towers.text.type=open_clip_text", f"model.towers.text.preset={architecture}",
        *(["model.init_logit_bias=0.0"] if "logit_bias" in state else [])])
    check_open_clip_compatible(cfg)
    model = MultiEncoder(cfg.model)
    model.load_state_dict(from_open_clip_state(state))
    return model, cfg


def initial_weights(path: str | Path) -> Dict[str, torch.Tensor]:
    """mmcl-named weights from an mmcl checkpoint directory, a Hugging Face CLIPModel directory, or an
    open_clip checkpoint file, told apart by what the path holds."""
    from open_clip.factory import load_state_dict

    path = Path(path)
    if (path / "config.json").is_file():
        from mmcl.checkpoint.hf_clip import import_hf_clip

        return import_hf_clip(path)[0]
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(path / "model.safetensors")
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
        raise ConfigError(f"config key 'model.init_from': {path} does not fit the configured model: "
                          f"no place for {unexpected[:5]}, other shapes for {wrong_shape[:5]}")
    model.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))
