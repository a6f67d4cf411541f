"""Training augmentations (data.augment): SimCLR's image policy and an audio policy.

The image ops are torchvision's transforms.v2; the audio ops (gain, time shift, SpecAugment's masks) are
a few tensor operations here, torchaudio not being a dependency. Every random draw comes from torch's
global RNG, which the training stream seeds per (seed, epoch, rank, worker) and keeps apart from the
model's; never from Python's `random` (which open_clip's own colour jitter and grayscale use, and which
an in-process stream does not seed). An op that is off is left out entirely rather than kept at p = 0:
torchvision's random ops draw even at p = 0, which would move every later draw, so the default policy
draws exactly what open_clip's training transform draws.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from open_clip.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, MaybeConvertMode, MaybeToTensor
from torchvision.transforms import InterpolationMode, v2

from mmcl.config import AudioAugmentConfig, DataConfig, ImageAugmentConfig
from mmcl.data.pipeline import InputSpec
from mmcl.errors import ConfigError

# The input kinds whose training preprocessing draws at random, so that K views of a sample differ.
VIEW_KINDS = ("image", "audio")


def image_train_transform(
    image_size: int | Tuple[int, int], policy: ImageAugmentConfig
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (3, H, W) normalised tensor: open_clip's training transform (bicubic random resized
    crop, RGB, to tensor, OpenAI's mean and std) with the policy's ops in SimCLR's order after the crop."""
    ops: List[Callable[[Any], Any]] = [
        v2.RandomResizedCrop(image_size, scale=tuple(policy.crop_scale), interpolation=InterpolationMode.BICUBIC),
        MaybeConvertMode("RGB"),
    ]
    if policy.flip_p:
        ops.append(v2.RandomHorizontalFlip(policy.flip_p))
    if policy.color_jitter_p:
        s = policy.color_jitter_strength
        ops.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=policy.color_jitter_p))
    if policy.grayscale_p:
        ops.append(v2.RandomGrayscale(policy.grayscale_p))
    if policy.blur_p:
        side = min(image_size) if isinstance(image_size, (tuple, list)) else image_size
        kernel = max(3, int(0.1 * side) // 2 * 2 + 1)  # 10% of the side, odd (SimCLR's)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, tuple(policy.blur_sigma))], p=policy.blur_p))
    # open_clip's tensor conversion (a division by 255; v2's ToDtype multiplies by 1/255, which differs
    # in the last bit) keeps the default policy bitwise open_clip's.
    ops += [MaybeToTensor(), v2.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    return v2.Compose(ops)


def uniform(low: float, high: float) -> float:
    """A draw from [low, high) on torch's RNG."""
    return float(torch.empty(()).uniform_(low, high))


class WaveformAugment:
    """Picklable (for loader workers): a (samples,) clip -> the clip with a random gain and time shift."""

    def __init__(self, policy: AudioAugmentConfig) -> None:
        self.policy = policy

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        low, high = self.policy.gain_db
        if (low, high) != (0.0, 0.0):
            clip = clip * 10 ** (uniform(low, high) / 20)  # dB of amplitude
        reach = int(self.policy.time_shift * clip.shape[0])  # the furthest shift, in samples
        if reach:
            shift = int(torch.randint(-reach, reach + 1, ()))
            clip = shifted(clip, shift, circular=self.policy.time_shift_mode == "circular")
        return clip


def shifted(clip: torch.Tensor, shift: int, circular: bool) -> torch.Tensor:
    """The clip moved `shift` samples later (earlier if negative); the vacated end wrapped or silent."""
    if circular:
        return torch.roll(clip, shift)
    out = torch.zeros_like(clip)
    if shift >= 0:
        out[shift:] = clip[: clip.shape[0] - shift]
    else:
        out[:shift] = clip[-shift:]
    return out


class SpectrogramMasks:
    """Picklable: SpecAugment's time and frequency masks on an (n_mels, frames) standardised log-mel.
    Each mask's width is drawn from 0..max (clamped to the spectrogram) and its start uniformly among
    the places it fits; masked cells become 0, the standardised spectrogram's mean."""

    def __init__(self, policy: AudioAugmentConfig) -> None:
        self.policy = policy

    def __call__(self, spectrogram: torch.Tensor) -> torch.Tensor:
        p = self.policy
        if not (p.time_masks and p.time_mask_max_width) and not (p.freq_masks and p.freq_mask_max_width):
            return spectrogram
        out = spectrogram.clone()
        for dim, masks, max_width in (
            (1, p.time_masks, p.time_mask_max_width),
            (0, p.freq_masks, p.freq_mask_max_width),
        ):
            for _ in range(masks if max_width else 0):
                size = out.shape[dim]
                width = min(int(torch.randint(0, max_width + 1, ())), size)
                start = int(torch.randint(0, size - width + 1, ()))
                out.narrow(dim, start, width).zero_()
        return out


class AugmentedViews:
    """Picklable: a decoded value -> (K, ...), K independent draws of the training preprocessing."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], views: int) -> None:
        self.preprocess, self.views = preprocess, views

    def __call__(self, value: Any) -> torch.Tensor:
        return torch.stack([self.preprocess(value) for _ in range(self.views)])  # K x (...) -> (K, ...)


def view_inputs(cfg: DataConfig, inputs: Mapping[str, InputSpec]) -> Dict[str, InputSpec]:
    """The training stream's inputs with each modality of data.views read as K augmented views."""
    out = dict(inputs)
    for modality, k in cfg.views.items():
        if k > 1:
            spec = inputs[modality]
            out[modality] = replace(spec, preprocess=AugmentedViews(spec.preprocess, k), views=k)
    return out


def check_views_config(cfg: DataConfig, kinds: Mapping[str, str], key: str = "data.views") -> None:
    """A ConfigError naming the key for views of a modality no fed tower has, or whose preprocessing draws
    nothing at random (`kinds`: each fed tower's modality -> what it reads)."""
    for modality, k in cfg.views.items():
        if modality not in kinds:
            raise ConfigError(f"config key '{key}.{modality}': not a fed tower ({', '.join(sorted(kinds))})")
        if kinds[modality] not in VIEW_KINDS:
            raise ConfigError(
                f"config key '{key}.{modality}': its tower reads {kinds[modality]}, which is not augmented "
                f"(views of: {', '.join(VIEW_KINDS)}; several captions: data.captions=all)"
            )
        if k < 1:
            raise ConfigError(f"config key '{key}.{modality}': must be at least 1, got {k}")
