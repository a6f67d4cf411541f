"""Towers: one encoder per modality, each projecting into the shared embedding space.

A tower is an nn.Module registered in TOWERS by name. Besides `forward(inputs) -> (B, embed_dim)` it
declares what it reads from a shard (`input_kind`) and how a decoded value becomes its input tensor
(`preprocess`), so the data stream is wired from the towers and a new modality needs no model edits.
The image and text towers are open_clip's own VisionTransformer and TextTransformer; the audio tower
(audio.py) is built from open_clip's transformer blocks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Type

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from torch import nn

from mmcl.config import ConfigError, TowerConfig
from mmcl.registry import Registry

# mmcl's tiny presets become open_clip model configs, so open_clip.create_model can build them too.
open_clip.add_model_config(Path(__file__).parent / "presets")

TOWERS: Registry[Type["Tower"]] = Registry("tower")


class Tower(nn.Module):
    input_kind: str  # decoder used for this tower's shard field: "image" | "text" | "audio"

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:
        raise NotImplementedError

    def placeholder(self) -> torch.Tensor:
        """The input standing in for a sample that lacks this modality (masked out of every loss)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: TowerConfig, key: str) -> None:
        """Raise ConfigError (naming `key`) for a config this tower cannot be built from."""


def merged_settings(settings_class: type, preset: Dict[str, Any], options: Dict[str, Any], key: str) -> Any:
    """settings_class(**preset, **options), after a ConfigError naming any option it does not have."""
    known = {f.name for f in dataclasses.fields(settings_class)}
    for name in options:
        if name not in known:
            raise ConfigError(f"config key '{key}.options.{name}': not a setting of {settings_class.__name__}")
    return settings_class(**{**preset, **options})


class OpenClipTower(Tower):
    """Shared handling of an open_clip preset + per-key overrides of its vision/text settings."""

    settings_class: type
    settings_key: str  # "vision_cfg" | "text_cfg" in open_clip's model configs

    @classmethod
    def settings(cls, cfg: TowerConfig, key: str = "tower") -> Any:
        base: Dict[str, Any] = {}
        if cfg.preset:
            model_cfg = open_clip.get_model_config(cfg.preset)
            if model_cfg is None:
                raise ConfigError(f"config key '{key}.preset': unknown open_clip model config {cfg.preset!r}")
            base = dict(model_cfg.get(cls.settings_key, {}))
        return merged_settings(cls.settings_class, base, cfg.options, key)

    @classmethod
    def check(cls, cfg: TowerConfig, key: str) -> None:
        cls.settings(cfg, key)


@TOWERS.register("open_clip_vision")
class OpenClipVisionTower(OpenClipTower):
    input_kind = "image"
    settings_class = CLIPVisionCfg
    settings_key = "vision_cfg"

    def __init__(self, cfg: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.vision_cfg: CLIPVisionCfg = self.settings(cfg)
        self.encoder = _build_vision_tower(embed_dim, self.vision_cfg)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # (B, 3, H, W) -> (B, embed_dim)

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:
        return image_transform(self.vision_cfg.image_size, is_train=train)

    def placeholder(self) -> torch.Tensor:
        size = self.vision_cfg.image_size
        return torch.zeros(3, *((size, size) if isinstance(size, int) else size))


class _Tokenize:
    """Picklable str -> (context_length,) token ids, for data-loader workers."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]  # (1, L) -> (L,)


@TOWERS.register("open_clip_text")
class OpenClipTextTower(OpenClipTower):
    input_kind = "text"
    settings_class = CLIPTextCfg
    settings_key = "text_cfg"

    def __init__(self, cfg: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.text_cfg: CLIPTextCfg = self.settings(cfg)
        self.encoder = _build_text_tower(embed_dim, self.text_cfg)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens)  # (B, L) -> (B, embed_dim)

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:
        return _Tokenize(self.text_cfg.context_length)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(self.text_cfg.context_length, dtype=torch.long)
