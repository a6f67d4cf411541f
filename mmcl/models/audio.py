"""The audio tower: a spectrogram transformer (AST-style) from open_clip's own transformer blocks.

waveform -> log-mel (n_mels, frames) -> non-overlapping (patch_freq, patch_time) patches -> linear
embedding + learnt positions + a class token -> open_clip Transformer -> class token -> projection.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from mmcl.config import AudioAugmentConfig, TowerConfig
from mmcl.data.audio import LogMel, MelSettings, crop_or_pad, resample
from mmcl.data.augment import SpectrogramMasks, WaveformAugment
from mmcl.data.decode import Waveform
from mmcl.errors import ConfigError
from mmcl.models.towers import TOWERS, Tower, merged_settings, transformer_depth


@dataclass
class AudioSettings(MelSettings):
    clip_seconds: float = 1.0  # every clip is cropped or padded to this length
    patch_freq: int = 16
    patch_time: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def frames(self) -> int:
        return LogMel.frames_for(self.clip_samples, self.hop_length)


AUDIO_PRESETS: Dict[str, Dict[str, Any]] = {
    # For CPU tests and the demo: 1.2 s at 16 kHz, 32 mels every 20 ms -> 4 x 15 patches.
    "mmcl-tiny": dict(
        clip_seconds=1.2, n_fft=512, hop_length=320, n_mels=32, patch_freq=8, patch_time=4, width=128, layers=2, heads=4
    ),
    # AST-like: 10 s, 128 mels every 10 ms, 16 x 16 patches, ViT-B/16 sized.
    "base": dict(clip_seconds=10.0, n_mels=128, width=768, layers=12, heads=12),
}


class AudioPreprocess:
    """Picklable (for data-loader workers): decoded waveform -> normalised log-mel (n_mels, frames). In
    training, `augment`'s gain and time shift act on the cropped clip and its masks on the log-mel."""

    def __init__(self, settings: AudioSettings, train: bool, augment: Optional[AudioAugmentConfig] = None) -> None:
        self.settings, self.train = settings, train
        self.log_mel = LogMel(settings)
        policy = augment if train and augment is not None else AudioAugmentConfig()  # the default changes nothing
        self.waveform_augment, self.masks = WaveformAugment(policy), SpectrogramMasks(policy)

    def __call__(self, waveform: Waveform) -> torch.Tensor:
        samples, rate = waveform
        clip = crop_or_pad(
            torch.from_numpy(np.ascontiguousarray(resample(samples, rate, self.settings.sample_rate))),
            self.settings.clip_samples,
            self.train,
        )
        spectrogram = self.log_mel(self.waveform_augment(clip))  # (n_mels, frames)
        # Per-clip standardisation: loudness and recording gain should not matter to the embedding.
        return self.masks((spectrogram - spectrogram.mean()) / (spectrogram.std() + 1e-5))


@TOWERS.register("audio_spectrogram")
class AudioSpectrogramTower(Tower):
    input_kind = "audio"
    embedding_names = frozenset({"patch_embed", "class_embedding", "positional_embedding", "ln_pre"})
    head_names = frozenset({"ln_post", "proj"})

    @classmethod
    def settings(cls, cfg: TowerConfig, key: str = "tower") -> AudioSettings:
        if cfg.preset and cfg.preset not in AUDIO_PRESETS:
            raise ConfigError(
                f"config key '{key}.preset': unknown audio preset {cfg.preset!r}; known: {', '.join(AUDIO_PRESETS)}"
            )
        settings = merged_settings(AudioSettings, AUDIO_PRESETS.get(cfg.preset, {}), cfg.options, key)
        if settings.n_mels % settings.patch_freq:
            raise ConfigError(
                f"config key '{key}.options': n_mels ({settings.n_mels}) is not a multiple of "
                f"patch_freq ({settings.patch_freq})"
            )
        if settings.width % settings.heads:
            raise ConfigError(
                f"config key '{key}.options': width ({settings.width}) is not a multiple of heads ({settings.heads})"
            )
        return settings

    @classmethod
    def check(cls, cfg: TowerConfig, key: str) -> None:
        cls.settings(cfg, key)

    @classmethod
    def input_settings(cls, cfg: TowerConfig, key: str) -> Dict[str, Any]:
        # The log-mel features and the clip length: what AudioPreprocess makes of a waveform.
        settings = cls.settings(cfg, key)
        return {f.name: getattr(settings, f.name) for f in fields(MelSettings)} | {
            "clip_seconds": settings.clip_seconds
        }

    @classmethod
    def blocks_in(cls, cfg: TowerConfig, key: str) -> Optional[int]:
        return cls.settings(cfg, key).layers

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.resblocks)

    def depth_of(self, name: str) -> int:
        return transformer_depth(name, self.embedding_names, self.head_names, self.num_blocks)

    def __init__(self, cfg: TowerConfig, embed_dim: int) -> None:
        super().__init__()
        s = self.audio_settings = self.settings(cfg)
        self.grid = (s.n_mels // s.patch_freq, s.frames // s.patch_time)  # trailing frames are dropped
        self.patch_embed = nn.Conv2d(1, s.width, (s.patch_freq, s.patch_time), (s.patch_freq, s.patch_time), bias=False)
        scale = s.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(s.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid[0] * self.grid[1], s.width))
        self.ln_pre = LayerNorm(s.width)
        self.transformer = Transformer(s.width, s.layers, s.heads, s.mlp_ratio)
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        self.ln_post = LayerNorm(s.width)
        self.proj = nn.Parameter(scale * torch.randn(s.width, embed_dim))

    def forward(self, spectrograms: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(spectrograms[:, None])  # (B, 1, M, T) -> (B, W, M/pf, T/pt)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.expand(tokens.shape[0], 1, -1).to(tokens.dtype)  # (B, 1, W)
        x = torch.cat([cls, tokens], dim=1) + self.positional_embedding.to(tokens.dtype)  # (B, 1 + P, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, W) x (W, embed_dim)

    def preprocess(self, train: bool, augment: Optional[AudioAugmentConfig] = None) -> Callable[[Any], torch.Tensor]:
        return AudioPreprocess(self.audio_settings, train, augment)

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(self.audio_settings.n_mels, self.audio_settings.frames)
