"""The bundled tri-modal set: handwritten digits (image), the same ten digits spoken (audio), captions.

Speech is synthesised here by the espeak-ng text-to-speech engine (a Debian package): every voice is
an accent x a voice variant, read at a seeded random speed and pitch, so the set is reproducible.
Two variants are held out: their voices (in every accent) are heard only in evaluation.

train/image_text/  image-text samples (png, txt); train/audio_text/  audio-text samples (flac, txt): two
        sources a config mixes by weight. Images and audio never share a sample, so any image-audio
        alignment is emergent, learnt through text.
test/   held-out images and held-out voices, one of each per sample, paired by digit only:
        png, flac, txt (a caption), cls (the label); plus classnames.txt, the prompt templates and
        dataset.json, which says retrieval counts a hit on any item of the query's class.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import soundfile

from data_prep.digits import CAPTIONS as IMAGE_CAPTIONS
from data_prep.digits import WORDS, png_bytes, split_digits
from data_prep.writer import ShardSetWriter

ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f5", "klatt"]
HELD_OUT_VARIANTS = ["m7", "f4"]

AUDIO_CAPTIONS = [
    "someone saying {word}",
    "the spoken word {word}",
    "a voice saying the number {digit}",
    "{word}",
    "the digit {word}",
    "the number {digit} read aloud",
    "a recording of a person saying {word}",
    "a short clip of speech: {word}",
]

TEMPLATES = ["the number {c}.", "the digit {c}.", "{c}.", "a {c}."]


@dataclass(frozen=True)
class Utterance:
    digit: int
    voice: str  # espeak-ng voice: accent+variant
    speed: int  # words per minute
    pitch: int  # 0..99

    @property
    def key(self) -> str:
        return f"{self.voice.replace('+', '_').replace('-', '_')}_{WORDS[self.digit]}_{self.speed}_{self.pitch}"


def espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError(
            "espeak-ng is not installed: apt-get install espeak-ng (scripts/env.sh installs it when run as root)"
        )
    return binary


def synthesise(utterance: Utterance, binary: str) -> bytes:
    """FLAC bytes of one utterance (espeak-ng writes a 22.05 kHz WAV to stdout)."""
    wav = subprocess.run(
        [
            binary,
            "-v",
            utterance.voice,
            "-s",
            str(utterance.speed),
            "-p",
            str(utterance.pitch),
            "--stdout",
            WORDS[utterance.digit],
        ],
        check=True,
        capture_output=True,
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC")
    return out.getvalue()


def utterances(variants: List[str], per_voice_and_digit: int, rng: random.Random) -> List[Utterance]:
    return [
        Utterance(digit, f"{accent}+{variant}", rng.randint(120, 200), rng.randint(25, 75))
        for accent in ACCENTS
        for variant in variants
        for digit in range(10)
        for _ in range(per_voice_and_digit)
    ]


def fill(template: str, digit: int) -> str:
    return template.format(word=WORDS[digit], digit=digit)


def prepare_spoken_digits(
    out_dir: str | Path,
    clips_per_voice: int = 3,
    captions_per_image: int = 2,
    samples_per_shard: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 4,
) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    binary = espeak_binary()
    rng = random.Random(seed)
    digits, train_idx, test_idx = split_digits(test_fraction, seed)
    train_speech = utterances(TRAIN_VARIANTS, clips_per_voice, rng)
    test_speech = utterances(HELD_OUT_VARIANTS, clips_per_voice, rng)
    with ThreadPoolExecutor(workers) as pool:  # each synthesis is its own espeak-ng process
        audio = dict(
            zip(
                train_speech + test_speech,
                pool.map(lambda u: synthesise(u, binary), train_speech + test_speech),
                strict=True,
            )
        )

    with ShardSetWriter(out_dir / "train" / "image_text", samples_per_shard) as image_text:
        for index in train_idx:
            label, image = int(digits.target[index]), png_bytes(digits.images[index])
            for k, template in enumerate(rng.sample(IMAGE_CAPTIONS, captions_per_image)):
                image_text.write({"__key__": f"digit{index:04d}_{k}", "png": image, "txt": fill(template, label)})
        image_text.extra_stats = {"images": len(train_idx)}
    with ShardSetWriter(out_dir / "train" / "audio_text", samples_per_shard) as audio_text:
        for utterance in train_speech:
            caption = fill(rng.choice(AUDIO_CAPTIONS), utterance.digit)
            audio_text.write({"__key__": utterance.key, "flac": audio[utterance], "txt": caption})
        audio_text.extra_stats = {"clips": len(train_speech), "voices": sorted({u.voice for u in train_speech})}

    # Each held-out image is paired with a held-out-voice clip of its digit.
    clips_by_digit: Dict[int, List[Utterance]] = {d: [u for u in test_speech if u.digit == d] for d in range(10)}
    for clips in clips_by_digit.values():
        rng.shuffle(clips)
    with ShardSetWriter(out_dir / "test", samples_per_shard, clip_benchmark_names=True) as test:
        for n, index in enumerate(test_idx):
            label = int(digits.target[index])
            clip = clips_by_digit[label][n % len(clips_by_digit[label])]
            test.write(
                {
                    "__key__": f"digit{index:04d}",
                    "png": png_bytes(digits.images[index]),
                    "flac": audio[clip],
                    "cls": str(label),
                    "txt": fill(rng.choice(IMAGE_CAPTIONS), label),
                }
            )
        test.extra_stats = {
            "images": len(test_idx),
            "clips": len(test_speech),
            "voices": sorted({u.voice for u in test_speech}),
        }

    (out_dir / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (out_dir / "dataset.json").write_text(json.dumps({"retrieval_match": "class"}, indent=1) + "\n")
    return {
        "train_image_text": image_text.sizes,
        "train_audio_text": audio_text.sizes,
        "test": test.sizes,
        "train_clips": len(train_speech),
        "test_clips": len(test_speech),
        "train_images": len(train_idx),
        "test_images": len(test_idx),
        "test_voices": len({u.voice for u in test_speech}),
    }
