"""data.augment: each op does what it says on real images and audio, the default policy is open_clip's
training transform bit for bit, bad values stop at load naming the key, and an augmented stream is
reproducible from its seed and resumes exactly."""

import io
import math
import random
from itertools import islice

import pytest
import torch
from open_clip.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform
from PIL import Image
from sklearn.datasets import load_sample_image

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl import config as config_lib
from mmcl.config import AudioAugmentConfig, ImageAugmentConfig
from mmcl.data import InputSpec, TrainStream
from mmcl.data.augment import SpectrogramMasks, WaveformAugment, image_train_transform
from mmcl.errors import ConfigError
from mmcl.models.audio import AudioPreprocess, AudioSettings
from mmcl.train.trainer import stream_inputs

from conftest import tiny_config, tiny_model

SIMCLR = ImageAugmentConfig(
    crop_scale=[0.08, 1.0], flip_p=0.5, color_jitter_p=0.8, color_jitter_strength=0.5, grayscale_p=0.2, blur_p=0.5
)


@pytest.fixture(scope="module")
def photo():
    """scikit-learn's bundled colour photograph (a temple in China), made small."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((96, 64))


def seeded(transform, image, seed=0):
    torch.manual_seed(seed)
    return transform(image)


def pixels(normalised):
    """(3, H, W) back to [0, 1] before open_clip's normalisation."""
    std, mean = torch.tensor(OPENAI_DATASET_STD)[:, None, None], torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    return normalised * std + mean


def test_the_default_policy_is_open_clips_training_transform_bit_for_bit(photo, digit_pngs):
    images = [photo] + [Image.open(io.BytesIO(png)) for png, _ in digit_pngs[:8]]  # RGB and grayscale
    ours, theirs = image_train_transform(32, ImageAugmentConfig()), image_transform(32, is_train=True)
    torch.manual_seed(3)
    expected = [theirs(image) for image in images]
    after_theirs = torch.get_rng_state()
    torch.manual_seed(3)
    assert all(torch.equal(ours(image), out) for image, out in zip(images, expected, strict=True))
    assert torch.equal(torch.get_rng_state(), after_theirs)  # the very same draws, so later samples match too


def test_flip_mirrors_and_grayscale_equalises_the_channels(photo):
    whole = ImageAugmentConfig(crop_scale=[1.0, 1.0])  # the whole image, at random aspect ratios
    for seed in range(3):
        plain = seeded(image_train_transform(32, whole), photo, seed)
        flipped = seeded(image_train_transform(32, ImageAugmentConfig(crop_scale=[1.0, 1.0], flip_p=1.0)), photo, seed)
        assert torch.equal(flipped, plain.flip(-1))
    colour = pixels(seeded(image_train_transform(32, whole), photo))
    gray = pixels(seeded(image_train_transform(32, ImageAugmentConfig(crop_scale=[1.0, 1.0], grayscale_p=1.0)), photo))
    assert (colour[0] - colour[2]).abs().max() > 0.1  # the photograph is in colour
    assert torch.allclose(gray[0], gray[1], atol=1e-6) and torch.allclose(gray[1], gray[2], atol=1e-6)


def test_colour_jitter_and_blur_change_what_they_say(photo):
    whole = ImageAugmentConfig(crop_scale=[1.0, 1.0])
    plain = pixels(seeded(image_train_transform(32, whole), photo))
    jitter = ImageAugmentConfig(crop_scale=[1.0, 1.0], color_jitter_p=1.0, color_jitter_strength=1.0)
    jittered = [pixels(seeded(image_train_transform(32, jitter), photo, seed)) for seed in range(4)]
    assert len({round(float(image.mean()), 4) for image in jittered}) == 4  # brightness, contrast... drawn anew
    assert all((image - plain).abs().max() > 0.05 for image in jittered)
    blur = ImageAugmentConfig(crop_scale=[1.0, 1.0], blur_p=1.0, blur_sigma=[2.0, 2.0])
    blurred = pixels(seeded(image_train_transform(32, blur), photo))

    def variation(image):  # total variation: a blur lowers it
        return float(
            (image[..., 1:] - image[..., :-1]).abs().sum() + (image[..., 1:, :] - image[..., :-1, :]).abs().sum()
        )

    assert variation(blurred) < 0.7 * variation(plain)
    assert abs(float(blurred.mean() - plain.mean())) < 0.02  # yet the same image on average


def test_simclr_policy_draws_differ_per_seed_and_repeat_per_seed(photo):
    transform = image_train_transform(32, SIMCLR)
    views = [seeded(transform, photo, seed) for seed in range(4)]
    assert views[0].shape == (3, 32, 32) and all(not torch.equal(views[0], view) for view in views[1:])
    assert torch.equal(seeded(transform, photo, 2), views[2])


def tone(seconds=1.0, rate=16000):
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * 440.0 * t)


def test_gain_doubles_the_amplitude_at_six_decibels():
    clip = tone()
    double = 20 * math.log10(2)
    gained = WaveformAugment(AudioAugmentConfig(gain_db=[double, double]))(clip)
    assert torch.allclose(gained, 2 * clip, rtol=1e-6, atol=0)
    torch.manual_seed(0)
    gains = [float(WaveformAugment(AudioAugmentConfig(gain_db=[-6.0, 6.0]))(clip).abs().max() / 0.5) for _ in range(50)]
    assert 10 ** (-6 / 20) <= min(gains) < 0.7 and 1.4 < max(gains) <= 10 ** (6 / 20)


@pytest.mark.parametrize("mode", ["circular", "zero"])
def test_time_shift_moves_the_clip_within_its_reach(mode):
    clip = torch.arange(1.0, 101.0)  # 100 samples, each its own value
    shift = WaveformAugment(AudioAugmentConfig(time_shift=0.2, time_shift_mode=mode))
    torch.manual_seed(0)
    offsets = set()
    for _ in range(60):
        out = shift(clip)
        if mode == "circular":
            start = int(out.argmin())  # where the first sample went
            offset = start if start <= 50 else start - 100
            assert torch.equal(out, torch.roll(clip, offset))
        else:
            silent = int((out == 0).sum())
            offset = silent if out[0] == 0 else -silent  # a later clip starts with silence, an earlier ends with it
            expected = torch.cat(
                [torch.zeros(offset), clip[: 100 - offset]] if offset >= 0 else [clip[silent:], torch.zeros(silent)]
            )
            assert torch.equal(out, expected)
        offsets.add(offset)
    assert max(map(abs, offsets)) <= 20 and len(offsets) > 15  # shifts of up to 20% either way


def test_masks_zero_whole_frames_and_bands_of_at_most_their_width():
    spectrogram = torch.randn(32, 61) + 5  # no cell is 0 by chance
    masks = SpectrogramMasks(
        AudioAugmentConfig(time_masks=1, time_mask_max_width=7, freq_masks=1, freq_mask_max_width=5)
    )
    torch.manual_seed(0)
    widths = set()
    for _ in range(60):
        out = masks(spectrogram)
        zero = out == 0
        frames, bands = zero.all(0), zero.all(1)  # (61,) frames zero in every band; (32,) bands zero throughout
        assert torch.equal(zero, frames[None, :] | bands[:, None])  # only whole frames and whole bands
        assert frames.sum() <= 7 and bands.sum() <= 5
        assert torch.equal(out[~zero], spectrogram[~zero])
        widths.add((int(frames.sum()), int(bands.sum())))
    assert {w for w, _ in widths} == set(range(8)) and {b for _, b in widths} == set(range(6))


def test_audio_preprocessing_masks_the_standardised_log_mel_in_training_only():
    settings = AudioSettings(clip_seconds=1.0, n_mels=32, hop_length=320, n_fft=512)
    policy = AudioAugmentConfig(time_masks=2, time_mask_max_width=10, gain_db=[-6.0, 6.0], time_shift=0.1)
    wave = (tone(1.3).numpy(), 16000)
    torch.manual_seed(1)
    plain = AudioPreprocess(settings, train=True)(wave)
    torch.manual_seed(1)
    masked = AudioPreprocess(settings, train=True, augment=AudioAugmentConfig(time_masks=2, time_mask_max_width=10))(
        wave
    )
    assert torch.equal(masked[:, masked.any(0)], plain[:, masked.any(0)])  # the crop's draw comes first
    assert 0 < int((~masked.any(0)).sum()) <= 20
    evaluated = AudioPreprocess(settings, train=False, augment=policy)
    assert torch.equal(evaluated(wave), AudioPreprocess(settings, train=False)(wave))


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.augment.image.crop_scale=[0.0,1.0]", "data.augment.image.crop_scale"),
        ("data.augment.image.crop_scale=[0.5,1.5]", "data.augment.image.crop_scale"),
        ("data.augment.image.crop_scale=[0.9,0.2]", "data.augment.image.crop_scale"),
        ("data.augment.image.flip_p=1.5", "data.augment.image.flip_p"),
        ("data.augment.image.grayscale_p=-0.1", "data.augment.image.grayscale_p"),
        ("data.augment.image.color_jitter_strength=3", "data.augment.image.color_jitter_strength"),
        ("data.augment.image.blur_sigma=[0,2]", "data.augment.image.blur_sigma"),
        ("data.augment.audio.gain_db=[6,-6]", "data.augment.audio.gain_db"),
        ("data.augment.audio.time_shift=2", "data.augment.audio.time_shift"),
        ("data.augment.audio.time_shift_mode=wrap", "data.augment.audio.time_shift_mode"),
        ("data.augment.audio.time_mask_max_width=-1", "data.augment.audio.time_mask_max_width"),
        ("data.augment.audio.freq_masks=-2", "data.augment.audio.freq_masks"),
    ],
)
def test_bad_policy_values_stop_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_lib.load(None, [override])


def test_evaluation_and_validation_inputs_are_never_augmented(photo):
    extra = {
        f"data.augment.image.{k}": v for k, v in [("flip_p", 1.0), ("grayscale_p", 1.0), ("crop_scale", "[0.1,0.2]")]
    }
    cfg, model = tiny_config(**extra), tiny_model()
    held_out = stream_inputs(model, cfg, ["image", "text"], train=False)["image"].preprocess
    assert torch.equal(seeded(held_out, photo), image_transform(32, is_train=False)(photo))
    training = stream_inputs(model, cfg, ["image", "text"], train=True)["image"].preprocess
    gray = pixels(seeded(training, photo))
    assert torch.allclose(gray[0], gray[2], atol=1e-6)  # the policy reaches the training stream


def write_photos(root, digit_pngs, photo, corrupt=0):
    """Shards of real images (the digits, and crops of the photograph) with captions; `corrupt` garbage."""
    with ShardSetWriter(root, 8) as writer:
        for i in range(corrupt):  # first, so that an epoch's batches count them
            writer.write({"__key__": f"bad{i}", "png": b"\x89PNG not an image", "txt": "x"})
        for i, (png, label) in enumerate(digit_pngs[:32]):
            if i % 2:  # half in colour: odd crops of the photograph
                buffer = io.BytesIO()
                photo.crop((i, 0, i + 48, 48)).save(buffer, format="PNG")
                png = buffer.getvalue()
            writer.write({"__key__": f"s{i:03d}", "png": png, "txt": f"digit {label}"})
    return brace_pattern(root, len(writer.sizes))


def text_length(text):
    return torch.tensor([len(text)])


AUGMENTED = {
    "image": InputSpec("image", ["png"], image_train_transform(32, SIMCLR)),
    "text": InputSpec("text", ["txt"], text_length),
}


def batches(urls, seed, n, workers=0, start=(0, 0), shuffle_buffer=0):
    stream = TrainStream(urls, AUGMENTED, 8, workers, shuffle_buffer, seed, start=start)
    return list(islice(stream, n))


def test_augmented_batches_repeat_bitwise_per_seed_and_differ_between_seeds(tmp_path, digit_pngs, photo):
    urls = write_photos(tmp_path, digit_pngs, photo)  # read in order (no shuffle): only the draws can differ
    random.seed(1)  # Python's RNG is not the data's: moving it changes nothing
    first = batches(urls, seed=5, n=6)
    random.seed(2)
    torch.manual_seed(7)  # nor is the process's torch RNG
    again = batches(urls, seed=5, n=6)
    other = batches(urls, seed=6, n=6)
    assert all(torch.equal(a.inputs["image"], b.inputs["image"]) for a, b in zip(first, again, strict=True))
    assert [b.keys for b in first] == [b.keys for b in other]
    assert all(not torch.equal(a.inputs["image"], b.inputs["image"]) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0].inputs["image"], first[4].inputs["image"])  # epoch 1 draws anew


@pytest.mark.parametrize("workers", [0, 2])
def test_an_augmented_stream_resumes_mid_epoch_on_the_same_batches(tmp_path, digit_pngs, photo, workers):
    urls = write_photos(tmp_path, digit_pngs, photo)
    whole = TrainStream(urls, AUGMENTED, batch_size=8, workers=workers, shuffle_buffer=16, seed=3)
    stream, taken = iter(whole), []
    for _ in range(6):  # 4 batches an epoch (per worker's share): positions mid-epoch and in the next
        taken.append((whole.position, next(stream)))
    for position, batch in [taken[1], taken[5]]:
        resumed = batches(urls, seed=3, n=1, workers=workers, start=position, shuffle_buffer=16)[0]
        assert resumed.keys == batch.keys
        assert torch.equal(resumed.inputs["image"], batch.inputs["image"])


def test_a_corrupt_image_is_still_skipped_and_counted_with_augmentation_on(tmp_path, digit_pngs, photo):
    urls = write_photos(tmp_path, digit_pngs, photo, corrupt=3)
    epoch = batches(urls, seed=0, n=4)  # 32 readable samples: 4 full batches
    assert sum(b.skipped for b in epoch) == 3
    assert not any("bad" in key for b in epoch for key in b.keys)
