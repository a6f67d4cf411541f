"""The bundled real set: scikit-learn's 1,797 handwritten digits (8x8 scans) with captions.

train/  shards of (png, txt): each training image several times, each time with another phrasing; or,
        with `captions_one_per_line`, each image once, its txt holding those phrasings one per line (for
        data.captions one/all: one phrasing drawn per read, or all of them as positives).
test/   held-out images (never in train/) with png, cls (label) and one txt caption, plus
        classnames.txt and zeroshot_classification_templates.txt: CLIP_benchmark's webdataset layout
        ({0..N}.tar and nshards.txt).
probe/  the training images once each, with png and cls: the labelled split a few-shot linear probe
        learns from (CLIP_benchmark's train split: `--train_split probe`).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from data_prep.writer import ShardSetWriter

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Phrasings mix the number word and the numeral, so the text tower learns both name the same class.
CAPTIONS = [
    "a photo of the number {word}",
    "handwritten {digit}",
    "the digit {word}",
    "a handwritten {word}",
    "a scan of the number {digit}",
    "{word}",
    "the number {digit} written by hand",
    "a blurry low resolution {word}",
    "an image of a {digit}",
    "a small grayscale picture of a {word}",
]

TEMPLATES = [
    "a photo of the number {c}.",
    "a handwritten {c}.",
    "the digit {c}.",
    "a scan of the number {c}.",
]


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8x8 array of 0..16 intensities -> grayscale PNG bytes (0..255)."""
    image = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(label: int, rng: random.Random) -> str:
    return rng.choice(CAPTIONS).format(word=WORDS[label], digit=label)


def split_digits(test_fraction: float, seed: int) -> Tuple[Any, np.ndarray, np.ndarray]:
    """(scikit-learn's digits, training indices, held-out indices), stratified by class."""
    digits: Any = load_digits()  # a Bunch: images, target
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, stratify=digits.target, random_state=seed)
    return digits, train_idx, test_idx


def prepare_digits(
    out_dir: str | Path,
    captions_per_image: int = 4,
    samples_per_shard: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
    captions_one_per_line: bool = False,
) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    digits, train_idx, test_idx = split_digits(test_fraction, seed)
    rng = random.Random(seed)

    with ShardSetWriter(out_dir / "train", samples_per_shard) as train:
        for index in train_idx:
            label = int(digits.target[index])
            image = png_bytes(digits.images[index])
            first = rng.randrange(len(CAPTIONS))  # consecutive phrasings: all distinct up to len(CAPTIONS)
            texts = [
                CAPTIONS[(first + k) % len(CAPTIONS)].format(word=WORDS[label], digit=label)
                for k in range(captions_per_image)
            ]
            if captions_one_per_line:  # the same phrasings as the other layout, in one sample
                train.write({"__key__": f"digit{index:04d}", "png": image, "txt": "\n".join(texts)})
            else:
                for k, text in enumerate(texts):
                    train.write({"__key__": f"digit{index:04d}_{k}", "png": image, "txt": text})
        train.extra_stats = {"source": "sklearn.datasets.load_digits", "images": len(train_idx)}

    with ShardSetWriter(out_dir / "test", samples_per_shard, clip_benchmark_names=True) as test:
        for index in test_idx:
            label = int(digits.target[index])
            test.write(
                {
                    "__key__": f"digit{index:04d}",
                    "png": png_bytes(digits.images[index]),
                    "cls": str(label),
                    "txt": caption(label, rng),
                }
            )
        test.extra_stats = {"source": "sklearn.datasets.load_digits", "images": len(test_idx)}

    with ShardSetWriter(out_dir / "probe", samples_per_shard, clip_benchmark_names=True) as probe:
        for index in train_idx:
            image = png_bytes(digits.images[index])
            probe.write({"__key__": f"digit{index:04d}", "png": image, "cls": str(int(digits.target[index]))})

    (out_dir / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {
        "train": train.sizes,
        "test": test.sizes,
        "probe": probe.sizes,
        "train_images": len(train_idx),
        "test_images": len(test_idx),
    }
