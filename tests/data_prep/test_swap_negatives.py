"""Rule-based negative captions (NegCLIP-style swaps): the rule, the manifest option, digit pairs."""

import csv
import re
import tarfile

import numpy as np
import torch
from PIL import Image

from data_prep.digit_pairs import pair_captions, prepare_digit_pairs
from data_prep.negatives import swap_negatives
from data_prep.pairs import manifest_pairs, write_pairs
from mmcl.cli import main
from mmcl.config import DataConfig
from mmcl.data import InputSpec, build_eval_loader
from mmcl.data.negatives import negative_inputs


def test_swaps_numbers_first_then_content_words_keeping_punctuation():
    assert swap_negatives("a 3 to the left of a 7", 3) == ["a 7 to the left of a 3"]
    assert swap_negatives("three then seven", 3) == ["seven then three"]
    assert swap_negatives("A red cube, next to a blue ball.", 2) == [
        "A cube red, next to a blue ball.",
        "A next cube, red to a blue ball.",
    ]
    assert swap_negatives("2 dogs and 2 cats", 5) == ["2 cats and 2 dogs"]  # equal numbers: no change, skipped
    assert swap_negatives("a cat", 3) == [] and swap_negatives("a dog and a cat", 0) == []


def read_samples(shard):
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read().decode() for m in tar if m.name.endswith("txt")}
    return members


def test_manifest_prep_writes_swapped_negatives_one_per_line(tmp_path, digit_pngs):
    rows = [("a", "a 1 beside 2 red cats"), ("b", "a small dog"), ("c", "cat")]
    for key, _ in rows:
        (tmp_path / f"{key}.png").write_bytes(digit_pngs[0][0])
    with open(tmp_path / "m.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "image", "caption"])
        writer.writerows([(key, f"{key}.png", caption) for key, caption in rows])
    out = tmp_path / "shards"
    stats = write_pairs(manifest_pairs(tmp_path / "m.csv"), out, progress=False, negatives=2)
    assert stats["samples"] == 3
    written = read_samples(out / "000000.tar")
    assert written["a.neg.txt"] == "a 2 beside 1 red cats\na 1 red 2 beside cats"  # at most 2
    assert written["b.neg.txt"] == "a dog small"
    assert "c.neg.txt" not in written  # no swap changes a one-word caption
    # Read back as training reads them: the caption-less sample is skipped and counted.
    inputs = {
        "text": InputSpec("text", ["txt"], lambda text: torch.tensor(len(text))),
        **negative_inputs(
            DataConfig(negatives={"text": "neg.txt"}), {"text": lambda t: torch.tensor(len(t))}, {"text": "text"}
        ),
    }
    (batch,) = build_eval_loader(str(out / "000000.tar"), inputs, batch_size=8)
    assert batch.skipped == 1 and batch.negatives["text"].shape == (2, 1)
    without = write_pairs(manifest_pairs(tmp_path / "m.csv"), tmp_path / "plain", progress=False)
    assert without["samples"] == 3 and not any(
        name.endswith("neg.txt") for name in read_samples(tmp_path / "plain/000000.tar")
    )


def read_images(shard):
    """member name -> the PNG decoded to a (16, 16) array."""
    with tarfile.open(shard) as tar:
        return {m.name: np.asarray(Image.open(tar.extractfile(m))) for m in tar if m.name.endswith("png")}


def test_digit_pairs_training_split_has_order_swapped_negatives(tmp_path):
    summary = prepare_digit_pairs(tmp_path, train_copies=2)
    assert sum(summary["train"].values()) == 2 * 90
    written, images = {}, {}
    for shard in summary["train"]:
        written.update(read_samples(tmp_path / "train" / shard))
        images.update(read_images(tmp_path / "train" / shard))
    keys = {name[: -len(".txt")] for name in written if not name.endswith(".neg.txt")}
    assert len(keys) == 180 and len(images) == 2 * 180
    for key in keys:
        left, right, copy = map(int, re.match(r"pair(\d)(\d)_(\d+)_", key).groups())
        assert written[f"{key}.txt"] == pair_captions(left, right)[copy % 3]
        assert written[f"{key}.neg.txt"] == pair_captions(right, left)[copy % 3]  # the same phrasing, order swapped
        # The negative image: the same two digit images, the right half moved left and the left half right.
        image, swapped = images[f"{key}.png"], images[f"{key}.neg.png"]
        assert np.array_equal(swapped, np.concatenate([image[:, 8:], image[:, :8]], axis=1))
        assert not np.array_equal(swapped, image)
    test_keys = {m.name.split(".")[0] for m in tarfile.open(tmp_path / "test" / "0.tar")}
    # The training split draws from the digits set's training images, the test split from held-out ones.
    train_images = {tuple(k.split("_")[2:]) for k in keys}
    test_images = {tuple(k.split("_")[2:]) for k in test_keys}
    assert not {i for pair in train_images for i in pair} & {i for pair in test_images for i in pair}


def test_prep_command_takes_negatives_swap(tmp_path, digit_pngs):
    (tmp_path / "d.png").write_bytes(digit_pngs[0][0])
    (tmp_path / "m.jsonl").write_text('{"image": "d.png", "caption": "a 4 next to a 9"}\n')
    out = tmp_path / "shards"
    args = ["prep", "manifest", str(tmp_path / "m.jsonl"), "--out", str(out), "--workers", "1", "--no-progress"]
    assert main([*args, "--negatives", "swap", "--negatives-per-caption", "1"]) == 0
    assert read_samples(out / "000000.tar")["000000001.neg.txt"] == "a 9 next to a 4"
