"""Audio preprocessing: decoded waveform -> target rate -> fixed-length clip -> log-mel spectrogram.

Resampling is soxr's and the mel filterbank is librosa's; only the framing and the log are written
here, on torch.stft. (Decoding, by libsndfile, is in decode.py with the other formats.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr
import torch


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return samples
    return soxr.resample(samples, rate, target_rate).astype(np.float32, copy=False)


def crop_or_pad(samples: torch.Tensor, length: int, train: bool) -> torch.Tensor:
    """A `length`-sample clip: a random window in training (torch's RNG, which the data stream
    seeds), the centre window in evaluation; shorter audio is centred in zeros."""
    extra = samples.shape[0] - length
    if extra > 0:
        start = int(torch.randint(extra + 1, ())) if train else extra // 2
        return samples[start : start + length]
    before = -extra // 2
    return torch.nn.functional.pad(samples, (before, -extra - before))


@dataclass
class MelSettings:
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0


class LogMel:
    """(samples,) waveform -> (n_mels, frames) natural-log mel power spectrogram."""

    def __init__(self, settings: MelSettings) -> None:
        import librosa.filters  # imported here: loading librosa takes a second, and only audio needs it

        self.settings = settings
        self.filterbank = torch.from_numpy(
            librosa.filters.mel(
                sr=settings.sample_rate,
                n_fft=settings.n_fft,
                n_mels=settings.n_mels,
                fmin=settings.f_min,
                fmax=settings.f_max,
            )
        )  # (n_mels, n_fft // 2 + 1)
        self.window = torch.hann_window(settings.n_fft)

    @staticmethod
    def frames_for(samples: int, hop_length: int) -> int:
        return samples // hop_length + 1  # centred frames, as librosa and torch.stft count them

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(
            samples,
            self.settings.n_fft,
            self.settings.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # (freqs, frames)
        power = spectrum.abs() ** 2
        return torch.log(self.filterbank @ power + 1e-6)  # (n_mels, freqs) x (freqs, frames)
