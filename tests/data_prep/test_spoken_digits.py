"""The tri-modal set built by data_prep: real speech from espeak-ng, images, captions, held-out voices."""

import io
import json
import random
import tarfile

import numpy as np
import soundfile
import torch

from data_prep.spoken_digits import ACCENTS, HELD_OUT_VARIANTS, TRAIN_VARIANTS, Utterance, espeak_binary, synthesise
from data_prep.writer import brace_pattern
from mmcl.data import InputSpec, TrainStream, expand_urls
from mmcl.data.decode import decode_audio
from mmcl.data.sources import Mixing, Source


def samples(shard):
    by_key = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, field = member.name.split(".", 1)
            by_key.setdefault(key, {})[field] = tar.extractfile(member).read()
    return by_key


def test_speech_is_real_reproducible_and_varies_by_voice():
    binary = espeak_binary()
    seven = Utterance(7, "en-us+m1", 150, 50)
    flac = synthesise(seven, binary)
    assert flac == synthesise(seven, binary)  # same voice, speed and pitch: the same bytes
    wave, rate = decode_audio(flac)
    assert rate == 22050 and 0.3 < len(wave) / rate < 2.0
    assert np.sqrt(np.mean(wave**2)) > 0.01  # speech, not silence
    other = decode_audio(synthesise(Utterance(7, "en-gb-scotland+f2", 150, 50), binary))[0]
    assert len(other) != len(wave) or not np.allclose(other, wave)


def test_round_trip(spoken_digits_root):
    root = spoken_digits_root
    image_stats = json.loads((root / "train" / "image_text" / "_stats.json").read_text())
    audio_stats = json.loads((root / "train" / "audio_text" / "_stats.json").read_text())
    test_stats = json.loads((root / "test" / "_stats.json").read_text())
    assert audio_stats["fields"] == {"flac": len(ACCENTS) * len(TRAIN_VARIANTS) * 10, "txt": audio_stats["samples"]}
    assert image_stats["fields"] == {"png": 1437, "txt": 1437} and image_stats["images"] == 1437
    assert test_stats["fields"] == {"png": 360, "flac": 360, "cls": 360, "txt": 360}
    train_voices, test_voices = set(audio_stats["voices"]), set(test_stats["voices"])
    assert not train_voices & test_voices  # evaluation voices are never heard in training
    assert {v.split("+")[1] for v in test_voices} == set(HELD_OUT_VARIANTS)
    assert json.loads((root / "dataset.json").read_text()) == {"retrieval_match": "class"}

    test = samples(root / "test" / "0.tar")
    words = (root / "classnames.txt").read_text().split()
    for fields in random.Random(0).sample(list(test.values()), 5):
        assert words[int(fields["cls"])] in fields["txt"].decode() or fields["cls"].decode() in fields["txt"].decode()
        soundfile.info(io.BytesIO(fields["flac"]))  # a readable FLAC


def test_the_two_training_sources_mix_by_weight(spoken_digits_root):
    """The tri-modal demo's stream: image-text and audio-text sources, a quarter of the samples from the
    first; each sample holds its source's modalities and a placeholder stands in for the other."""
    train = spoken_digits_root / "train"
    sources = [
        Source(expand_urls(brace_pattern(train / name, len(json.loads((train / name / "sizes.json").read_text())))),
               weight, {modality: [field], "text": ["txt"]})
        for name, modality, field, weight in (("image_text", "image", "png", 1.0), ("audio_text", "audio", "flac", 3.0))
    ]  # fmt: skip
    inputs = {
        "image": InputSpec("image", ["png"], lambda im: torch.ones(1), placeholder=torch.zeros(1)),
        "audio": InputSpec("audio", ["flac"], lambda wave: torch.ones(1), placeholder=torch.zeros(1)),
        "text": InputSpec("text", ["txt"], lambda s: torch.ones(1)),
    }
    stream = TrainStream("", inputs, 100, workers=0, shuffle_buffer=50, seed=0, mixing=Mixing(sources, False, 2000))
    batches = [batch for _, batch in zip(range(10), stream, strict=False)]
    for batch in batches:
        assert batch.skipped == 0
        assert torch.equal(batch.present["image"], ~batch.present["audio"])
        assert torch.equal(batch.present["audio"], torch.tensor(batch.sources) == 1)
        assert torch.equal(batch.inputs["image"][~batch.present["image"]], torch.zeros(sum(batch.sources), 1))
        assert all(
            ("/audio_text/" in key) == (source == 1) for key, source in zip(batch.keys, batch.sources, strict=True)
        )
    assert sum(sum(batch.sources) for batch in batches) == 750
