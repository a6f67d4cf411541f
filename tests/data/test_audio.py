"""Audio decoding, resampling, cropping and log-mel features against independent library references."""

import io

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile
import torch

from mmcl.data.audio import LogMel, MelSettings, crop_or_pad, resample
from mmcl.data.decode import SampleError, decode_audio


def tone(seconds=0.5, rate=22050, freq=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else wave


def encoded(samples, rate, fmt, subtype=None):
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, tolerance",
    [
        ("WAV", "PCM_16", 1 / 2**15),
        ("FLAC", "PCM_16", 1 / 2**15),
        ("WAV", "FLOAT", 1e-7),
        ("OGG", "VORBIS", 0.05),
    ],
)
def test_decode_formats(fmt, subtype, tolerance):
    wave = tone()
    samples, rate = decode_audio(encoded(wave, 22050, fmt, subtype))
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == wave.shape
    assert np.abs(samples - wave).max() <= tolerance


def test_decode_mp3():
    wave = tone(rate=44100)
    samples, rate = decode_audio(encoded(wave, 44100, "MP3", "MPEG_LAYER_III"))
    assert rate == 44100
    assert abs(len(samples) - len(wave)) < 0.05 * len(wave)  # MP3 frames pad the ends a little
    assert np.sqrt(np.mean(samples**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_decode_downmixes_to_mono():
    stereo = tone(channels=2)
    samples, _ = decode_audio(encoded(stereo, 22050, "WAV", "FLOAT"))
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00garbage", encoded(tone(), 22050, "FLAC")[:60]])
def test_unreadable_audio_is_a_sample_error(data):
    with pytest.raises(SampleError):
        decode_audio(data)


def test_resample_matches_scipy_polyphase():
    wave = tone(seconds=1.0, rate=22050, freq=300.0).astype(np.float32)
    ours = resample(wave, 22050, 16000)
    reference = scipy.signal.resample_poly(wave, 320, 441)  # 16000 / 22050 = 320 / 441
    assert ours.shape == reference.shape == (16000,)
    middle = slice(500, -500)  # the two filters treat the edges differently
    assert np.abs(ours[middle] - reference[middle]).max() < 2e-3


def test_crop_or_pad():
    clip = torch.arange(10.0)
    assert torch.equal(crop_or_pad(clip, 4, train=False), torch.tensor([3.0, 4, 5, 6]))  # the centre
    assert torch.equal(crop_or_pad(clip, 13, train=False)[1:11], clip)  # centred in zeros
    assert crop_or_pad(clip, 13, train=False).sum() == clip.sum()
    torch.manual_seed(0)
    windows = {tuple(crop_or_pad(clip, 4, train=True).tolist()) for _ in range(50)}
    assert len(windows) > 3 and all(w == tuple(range(int(w[0]), int(w[0]) + 4)) for w in windows)
    torch.manual_seed(0)
    again = {tuple(crop_or_pad(clip, 4, train=True).tolist()) for _ in range(50)}
    assert again == windows  # random crops draw from torch's (seeded) RNG


def test_log_mel_matches_librosa():
    settings = MelSettings(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40, f_min=20.0, f_max=7600.0)
    rng = np.random.default_rng(0)
    wave = (tone(seconds=0.7, rate=16000, freq=700.0) + 0.1 * rng.standard_normal(11200)).astype(np.float32)
    ours = LogMel(settings)(torch.from_numpy(wave))
    reference = np.log(
        librosa.feature.melspectrogram(
            y=wave,
            sr=16000,
            n_fft=512,
            hop_length=160,
            window="hann",
            center=True,
            pad_mode="constant",
            power=2.0,
            n_mels=40,
            fmin=20.0,
            fmax=7600.0,
        )
        + 1e-6
    )
    assert ours.shape == reference.shape == (40, LogMel.frames_for(len(wave), 160))
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-4, atol=1e-3)
