"""Compositional digits: two real handwritten digits side by side, captioned by their order.

Each image is 16x16: the two 8x8 digits side by side in its middle rows, blank rows above and below,
so that the square crops of image preprocessing keep both digits whole.

<out>/test/{0..N}.tar  png and txt: several captions of the image, one per line ("a 3 to the left of a 7",
                       "a 7 to the right of a 3", ...)
<out>/test/nshards.txt, <out>/dataset_type.txt ("retrieval"): CLIP_benchmark's retrieval layout, which
                       mmcl eval and CLIP_benchmark both read.
<out>/order/           the caption-choice set of the same images (dataset_type.txt "caption_choice"): one
                       sample per image and phrasing, txt the phrasing and neg.txt the same phrasing with the
                       two digits swapped. Telling them apart takes reading the order: a model that sees a
                       caption as a bag of words scores about 50%.
<out>/train/{000000..N}.tar  (with `train_copies` > 0) png, txt: one caption, neg.txt: that caption
                       with the two digits swapped ("a 7 to the left of a 3"), and neg.png: the image
                       with its two digits swapped, for data.negatives (text, image, or both).

The test digits are held-out images of the digits set (the same split and seed as data_prep/digits.py), so a
model trained on that set never saw them. Every ordered pair of two different digits appears
`images_per_pair` times, each from other images; the captions name only the two digits and their
order, so telling an image's captions from its swapped pair's takes reading the order. The training
digits are the digits set's training images; each ordered pair appears `train_copies` times, its captions
taken in turn, each with its order-swapped caption and order-swapped image as hard negatives.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

from data_prep.digits import WORDS, png_bytes, split_digits
from data_prep.negatives import swap_negatives
from data_prep.writer import ShardSetWriter

CAPTIONS = [
    "a {left} to the left of a {right}",
    "a {right} to the right of a {left}",
    "{left_word} then {right_word}",
]


def pair_captions(left: int, right: int) -> List[str]:
    """The phrasings of one ordered pair, each naming the digits and their order."""
    return [c.format(left=left, right=right, left_word=WORDS[left], right_word=WORDS[right]) for c in CAPTIONS]


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two 8x8 digits -> one 16x16 image: side by side in the middle rows, blank rows above and below."""
    image = np.zeros((16, 16), dtype=left.dtype)
    image[4:12] = np.concatenate([left, right], axis=1)  # (8, 8) + (8, 8) -> (8, 16)
    return image


def prepare_digit_pairs(
    out_dir: str | Path,
    images_per_pair: int = 1,
    samples_per_shard: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_copies: int = 0,
) -> Dict[str, object]:
    out_dir = Path(out_dir)
    digits, train_idx, test_idx = split_digits(test_fraction, seed)
    next_image = _image_picker(digits.target, test_idx, random.Random(seed))
    test_images = [
        (left, right, copy, next_image(left), next_image(right))
        for copy in range(images_per_pair)
        for left in range(10)
        for right in range(10)
        if left != right
    ]
    with ShardSetWriter(out_dir / "test", samples_per_shard, clip_benchmark_names=True) as test:
        for left, right, copy, a, b in test_images:
            test.write(
                {
                    "__key__": f"pair{left}{right}_{copy}_{a:04d}_{b:04d}",
                    "png": png_bytes(side_by_side(digits.images[a], digits.images[b])),
                    "txt": "\n".join(pair_captions(left, right)),
                }
            )
        test.extra_stats = {"source": "sklearn.datasets.load_digits (held-out images)", "captions_per_image": 3}
    (out_dir / "dataset_type.txt").write_text("retrieval\n")
    summary: Dict[str, object] = {"test": test.sizes, "images": sum(test.sizes.values())}
    summary["order"] = _write_order(out_dir / "order", digits, test_images, samples_per_shard)
    if train_copies:
        summary["train"] = _write_train(out_dir / "train", digits, train_idx, train_copies, samples_per_shard, seed)
    return summary


def _write_order(out: Path, digits: Any, test_images: List[tuple], samples_per_shard: int) -> Dict[str, int]:
    """The caption-choice set: each test image once per phrasing, against that phrasing order-swapped."""
    with ShardSetWriter(out / "test", samples_per_shard, clip_benchmark_names=True) as order:
        for left, right, copy, a, b in test_images:
            image = png_bytes(side_by_side(digits.images[a], digits.images[b]))
            swapped = pair_captions(right, left)
            for phrasing, caption in enumerate(pair_captions(left, right)):
                order.write(
                    {
                        "__key__": f"pair{left}{right}_{copy}_{a:04d}_{b:04d}_{phrasing}",
                        "png": image,
                        "txt": caption,
                        "neg.txt": swapped[phrasing],
                    }
                )
        order.extra_stats = {"source": "sklearn.datasets.load_digits (held-out images)", "negatives": "order-swapped"}
    (out / "dataset_type.txt").write_text("caption_choice\n")
    return order.sizes


def _image_picker(targets: np.ndarray, indices: np.ndarray, rng: random.Random) -> Callable[[int], int]:
    """digit -> the next of its images among `indices` (shuffled once, then in turn), so a pair's differ."""
    by_digit: Dict[int, List[int]] = {d: [int(i) for i in indices if targets[i] == d] for d in range(10)}
    for images in by_digit.values():
        rng.shuffle(images)
    used = {d: 0 for d in range(10)}

    def next_image(digit: int) -> int:
        images = by_digit[digit]
        index = images[used[digit] % len(images)]
        used[digit] += 1
        return index

    return next_image


def _write_train(
    out: Path, digits: Any, train_idx: np.ndarray, copies: int, samples_per_shard: int, seed: int
) -> Dict[str, int]:
    """Training pairs of training images: one caption each (the phrasings in turn) and, as hard
    negatives, the caption and the image with the two digits swapped: only the order tells them apart."""
    next_image = _image_picker(digits.target, train_idx, random.Random(seed + 1))
    with ShardSetWriter(out, samples_per_shard) as train:
        for copy in range(copies):
            for left in range(10):
                for right in range(10):
                    if left == right:
                        continue
                    a, b = next_image(left), next_image(right)
                    caption = pair_captions(left, right)[copy % len(CAPTIONS)]
                    train.write(
                        {
                            "__key__": f"pair{left}{right}_{copy}_{a:04d}_{b:04d}",
                            "png": png_bytes(side_by_side(digits.images[a], digits.images[b])),
                            "txt": caption,
                            "neg.txt": "\n".join(swap_negatives(caption, 1)),
                            # The same two digit images in swapped order: the caption's negative image.
                            "neg.png": png_bytes(side_by_side(digits.images[b], digits.images[a])),
                        }
                    )
        train.extra_stats = {"source": "sklearn.datasets.load_digits (training images)", "negatives": "order-swapped"}
    return train.sizes
