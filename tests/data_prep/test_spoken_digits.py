"""The tri-modal set built by data_prep: real speech from espeak-ng, images, captions, held-out voices."""

import io
import json
import random
import tarfile

import numpy as np
import soundfile
import torch

from data_prep.spoken_digits import ACCENTS, HELD_OUT_VARIANTS, TRAIN_VARIANTS, Utterance, espeak_binary, synthesise
from mmcl.data import InputSpec, build_eval_loader
from mmcl.data.decode import decode_audio


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
    train_stats = json.loads((root / "train" / "_stats.json").read_text())
    test_stats = json.loads((root / "test" / "_stats.json").read_text())
    assert train_stats["fields"]["flac"] == len(ACCENTS) * len(TRAIN_VARIANTS) * 10
    assert train_stats["fields"]["png"] == train_stats["images"] == 1437
    assert test_stats["fields"] == {"png": 360, "flac": 360, "cls": 360, "txt": 360}
    train_voices, test_voices = set(train_stats["voices"]), set(test_stats["voices"])
    assert not train_voices & test_voices  # evaluation voices are never heard in training
    assert {v.split("+")[1] for v in test_voices} == set(HELD_OUT_VARIANTS)
    assert json.loads((root / "dataset.json").read_text()) == {"retrieval_match": "class"}

    train = samples(root / "train" / "000000.tar")
    kinds = {frozenset(fields) for fields in train.values()}
    assert kinds == {frozenset({"png", "txt"}), frozenset({"flac", "txt"})}  # image and audio never together
    test = samples(root / "test" / "0.tar")
    words = (root / "classnames.txt").read_text().split()
    for fields in random.Random(0).sample(list(test.values()), 5):
        assert words[int(fields["cls"])] in fields["txt"].decode() or fields["cls"].decode() in fields["txt"].decode()
        soundfile.info(io.BytesIO(fields["flac"]))  # a readable FLAC

    # Through the stream: both modalities optional, every sample holds one of them.
    inputs = {
        "image": InputSpec("image", ["png"], lambda im: torch.ones(1), placeholder=torch.zeros(1)),
        "audio": InputSpec("audio", ["flac"], lambda wave: torch.ones(1), placeholder=torch.zeros(1)),
        "text": InputSpec("text", ["txt"], lambda s: torch.ones(1)),
    }
    batch = next(iter(build_eval_loader(str(root / "train" / "000000.tar"), inputs, batch_size=200)))
    assert batch.skipped == 0
    assert torch.equal(batch.present["image"], ~batch.present["audio"])
    assert 0 < batch.present["audio"].sum() < 200
