"""Towers: one encoder per modality, each projecting into the shared embedding space.

A tower is an nn.Module registered in TOWERS by name. Besides `forward(inputs) -> (B, embed_dim)` it
declares what it reads from a shard (`input_kind`) and how a decoded value becomes its input tensor
(`preprocess`), so the data stream is wired from the towers and a new modality needs no model edits.
The image and text towers are open_clip's own VisionTransformer and TextTransformer; the audio tower
(audio.py) is built from open_clip's transformer blocks.

open_clip keeps one model-level `quick_gelu` flag (true for every OpenAI CLIP architecture); here it is
a setting of each open_clip tower, read from the preset's top level and overridable in `options`, so
the activation travels with the tower into checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Optional, Set, Type

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from torch import nn

from mmcl.config import ImageAugmentConfig, TowerConfig
from mmcl.data.augment import image_train_transform
from mmcl.errors import ConfigError
from mmcl.registry import Registry

# mmcl's tiny presets become open_clip model configs, so open_clip.create_model can build them too.
open_clip.add_model_config(Path(__file__).parent / "presets")

TOWERS: Registry[Type["Tower"]] = Registry("tower")


class Tower(nn.Module):
    input_kind: str  # decoder used for this tower's shard field: "image" | "text" | "audio"

    def preprocess(self, train: bool, augment: Any = None) -> Callable[[Any], torch.Tensor]:
        """A decoded value -> the tower's input. `augment`: the training augmentation policy of the tower's
        input kind (data.augment.image, .audio), or None for the default; evaluation never augments."""
        raise NotImplementedError

    def placeholder(self) -> torch.Tensor:
        """The input standing in for a sample that lacks this modality (masked out of every loss)."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: TowerConfig, key: str) -> None:
        """Raise ConfigError (naming `key`) for a config this tower cannot be built from."""

    @classmethod
    def input_settings(cls, cfg: TowerConfig, key: str) -> Dict[str, Any]:
        """What the tower built from `cfg` takes as input (two towers with equal settings embed the same
        preprocessed batch, as a distillation teacher and its student must). By default the whole
        tower config: only an identical tower is known to take the same inputs."""
        return {"type": cfg.type, "preset": cfg.preset, "options": dict(cfg.options)}

    @classmethod
    def blocks_in(cls, cfg: TowerConfig, key: str) -> Optional[int]:
        """The number of transformer blocks the tower built from `cfg` has (None: not a stack of blocks
        mmcl can count, e.g. a ResNet), checked without building it."""
        return None

    @property
    def num_blocks(self) -> int:
        """L: the tower's depths run from 0 (the embeddings) through 1..L (its blocks) to L + 1 (its head)."""
        raise NotImplementedError(f"{type(self).__name__} has no transformer blocks to count")

    def depth_of(self, name: str) -> int:
        """The depth of the parameter `name` (as the tower's named_parameters() names it)."""
        raise NotImplementedError(f"{type(self).__name__} has no transformer blocks to count")

    def norm_parameter_names(self) -> Set[str]:
        """The gains and biases of the tower's normalisation layers, chosen by module type."""
        return {
            f"{module_name}.{name}" if module_name else name
            for module_name, module in self.named_modules()
            if isinstance(module, NORM_LAYERS)
            for name, _ in module.named_parameters(recurse=False)
        }


# open_clip's LayerNorm and LayerNormFp32 subclass nn.LayerNorm; ResNet towers hold BatchNorm2d.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def transformer_depth(name: str, embedding: FrozenSet[str], head: FrozenSet[str], num_blocks: int) -> int:
    """The depth of a parameter of an open_clip-style transformer (the depths of BEiT's and timm's
    layer-wise decay: embeddings 0, block i at i + 1, the head at L + 1), `name` relative to the module
    holding `transformer.resblocks`, its other parameters looked up by their first name in a table."""
    parts = name.split(".")
    if parts[:2] == ["transformer", "resblocks"]:
        return int(parts[2]) + 1
    if parts[0] in embedding:
        return 0
    if parts[0] in head:
        return num_blocks + 1
    # A parameter of neither table would otherwise be guessed into a depth: the table needs an entry.
    raise ValueError(f"parameter {name!r} has no depth: add it to its tower's embedding or head names")


def merged_settings(settings_class: type, preset: Dict[str, Any], options: Dict[str, Any], key: str) -> Any:
    """settings_class(**preset, **options), after a ConfigError naming any option it does not have or
    whose value is not of its setting's plain type (bool, int, float, str)."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings_class)}
    for name, value in options.items():
        if name not in defaults:
            raise ConfigError(f"config key '{key}.options.{name}': not a setting of {settings_class.__name__}")
        if not _plain_type_fits(defaults[name], value):
            raise ConfigError(f"config key '{key}.options.{name}': {value!r} is not a {type(defaults[name]).__name__}")
    return settings_class(**{**preset, **options})


def _plain_type_fits(default: Any, value: Any) -> bool:
    """Whether `value` can stand where `default` does; only plain defaults are checked (a None or a
    tuple default admits other shapes, and open_clip's sizes take a tuple where the default is an int)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, (int, list, tuple)) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


@dataclass
class VisionSettings(CLIPVisionCfg):
    quick_gelu: bool = False  # QuickGELU (x * sigmoid(1.702 x)) instead of GELU, as OpenAI's CLIP


@dataclass
class TextSettings(CLIPTextCfg):
    quick_gelu: bool = False


class OpenClipTower(Tower):
    """Shared handling of an open_clip preset + per-key overrides of its vision/text settings."""

    settings_class: type
    settings_key: str  # "vision_cfg" | "text_cfg" in open_clip's model configs
    # The parameters (by first name inside the open_clip module) below the first block and above the last.
    embedding_names: FrozenSet[str]
    head_names: FrozenSet[str]

    @classmethod
    def settings(cls, cfg: TowerConfig, key: str = "tower") -> Any:
        base: Dict[str, Any] = {}
        if cfg.preset:
            model_cfg = open_clip.get_model_config(cfg.preset)
            if model_cfg is None:
                raise ConfigError(f"config key '{key}.preset': unknown open_clip model config {cfg.preset!r}")
            base = {**model_cfg.get(cls.settings_key, {}), "quick_gelu": bool(model_cfg.get("quick_gelu", False))}
        return merged_settings(cls.settings_class, base, cfg.options, key)

    @classmethod
    def check(cls, cfg: TowerConfig, key: str) -> None:
        cls.settings(cfg, key)

    @property
    def num_blocks(self) -> int:
        return len(list(self.get_submodule("encoder.transformer.resblocks").children()))

    def depth_of(self, name: str) -> int:
        prefix, inner = name.split(".", 1)
        if prefix != "encoder":
            raise ValueError(f"parameter {name!r} is not one of the open_clip module's")
        return transformer_depth(inner, self.embedding_names, self.head_names, self.num_blocks)


@TOWERS.register("open_clip_vision")
class OpenClipVisionTower(OpenClipTower):
    input_kind = "image"
    settings_class = VisionSettings
    settings_key = "vision_cfg"
    # As open_clip's VisionTransformer.lock groups them: ln_pre with the embeddings, ln_post and the
    # projection (or attentional pooler) above the last block.
    embedding_names = frozenset({"conv1", "class_embedding", "positional_embedding", "ln_pre"})
    head_names = frozenset({"attn_pool", "attn_pool_contrastive", "ln_post", "proj"})

    @classmethod
    def blocks_in(cls, cfg: TowerConfig, key: str) -> Optional[int]:
        settings = cls.settings(cfg, key)
        # A tuple of layers builds open_clip's ModifiedResNet, a timm name a timm model: no resblocks.
        is_transformer = isinstance(settings.layers, int) and not settings.timm_model_name
        return settings.layers if is_transformer else None

    @classmethod
    def input_settings(cls, cfg: TowerConfig, key: str) -> Dict[str, Any]:
        # The image transform depends on the size alone (open_clip's default mean and std, see preprocess).
        size = cls.settings(cfg, key).image_size
        return {"image_size": (size, size) if isinstance(size, int) else tuple(size)}

    def __init__(self, cfg: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.vision_cfg: VisionSettings = self.settings(cfg)
        self.encoder = _build_vision_tower(embed_dim, self.vision_cfg, quick_gelu=self.vision_cfg.quick_gelu)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # (B, 3, H, W) -> (B, embed_dim)

    def preprocess(self, train: bool, augment: Optional[ImageAugmentConfig] = None) -> Callable[[Any], torch.Tensor]:
        if not train:
            return image_transform(self.vision_cfg.image_size, is_train=False)
        return image_train_transform(self.vision_cfg.image_size, augment or ImageAugmentConfig())

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
    settings_class = TextSettings
    settings_key = "text_cfg"
    embedding_names = frozenset({"token_embedding", "positional_embedding", "cls_emb"})
    head_names = frozenset({"ln_final", "text_projection"})

    @classmethod
    def blocks_in(cls, cfg: TowerConfig, key: str) -> Optional[int]:
        settings = cls.settings(cfg, key)
        return None if settings.hf_model_name else settings.layers  # a Hugging Face text model: no resblocks

    @classmethod
    def input_settings(cls, cfg: TowerConfig, key: str) -> Dict[str, Any]:
        # Every open_clip text tower here reads open_clip's BPE tokens: the same ids, padded to the context.
        settings = cls.settings(cfg, key)
        return {"context_length": settings.context_length, "vocab_size": settings.vocab_size}

    def __init__(self, cfg: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.text_cfg: TextSettings = self.settings(cfg)
        self.encoder = _build_text_tower(embed_dim, self.text_cfg, quick_gelu=self.text_cfg.quick_gelu)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens)  # (B, L) -> (B, embed_dim)

    def preprocess(self, train: bool, augment: Any = None) -> Callable[[Any], torch.Tensor]:
        return _Tokenize(self.text_cfg.context_length)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(self.text_cfg.context_length, dtype=torch.long)
