"""Manifest columns for several captions and for negatives: what the shards hold, and that the training
side's reader (data.captions, data.negatives) reads back what the prep wrote."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.pairs import manifest_pairs, write_pairs
from mmcl.cli import main
from mmcl.config import DataConfig
from mmcl.data import InputSpec, build_eval_loader
from mmcl.data.captions import caption_inputs
from mmcl.data.decode import decode_image
from mmcl.data.negatives import negative_inputs
from mmcl.errors import DataError

WIDTH = 40


@pytest.fixture
def images(tmp_path, digit_pngs):
    """d0.png ... d5.png, up.PNG (an upper-case extension), j.jpg, broken.png, ../outside.png -> their bytes."""
    root = tmp_path / "data"
    root.mkdir()
    files = {f"d{i}.png": digit_pngs[i][0] for i in range(6)}
    files["up.PNG"] = digit_pngs[6][0]
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(digit_pngs[7][0])).convert("RGB").save(jpeg, format="JPEG")
    files["j.jpg"] = jpeg.getvalue()
    files["broken.png"] = b"not an image"
    for name, data in files.items():
        (root / name).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(digit_pngs[8][0])
    return root, files


def shard_members(out):
    """Sample key -> {field: bytes} of every shard in `out`."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def rejected(out):
    return {r["source"]: r["reason"] for r in json.loads((out / "_stats.json").read_text())["rejected_inputs"]}


JSONL_ROWS = [
    # several captions: empty and non-string entries dropped, a line break inside one made a space
    {
        "key": "lists",
        "image": "d0.png",
        "caption": ["a zero", "", 5, " the digit\nzero "],
        "neg": ["not a zero", 7, "", "a one"],
        "neg_image": "d1.png",
    },
    # negatives as a string of lines; several negative images, each keeping its own (lowercased) extension
    {
        "key": "lines",
        "image": "d1.png",
        "caption": "a one",
        "neg": "a two\n\n  a three \n",
        "neg_image": ["d2.png", "up.PNG", "j.jpg"],
    },
    {"key": "plain", "image": "d2.png", "caption": "a two"},  # no negatives: no neg fields
    {"key": "single_jpg", "image": "d3.png", "caption": ["a three"], "neg": [], "neg_image": ["j.jpg"]},
    {"key": "missing", "image": "d4.png", "caption": "x", "neg_image": ["d1.png", "gone.png"]},
    {"key": "outside", "image": "d4.png", "caption": "x", "neg_image": "../outside.png"},
    {"key": "corrupt", "image": "d4.png", "caption": "x", "neg_image": "broken.png"},
    {"key": "no_captions", "image": "d4.png", "caption": ["", None, 3]},
]


def write_jsonl(root, rows=JSONL_ROWS):
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def test_jsonl_caption_lists_and_negative_columns_are_written_as_the_reader_expects(tmp_path, images):
    root, files = images
    out = tmp_path / "shards"
    pairs = manifest_pairs(write_jsonl(root), negatives_column="neg", negative_image_column="neg_image")
    stats = write_pairs(pairs, out, samples_per_shard=3, progress=False)
    assert stats["samples"] == 4 and stats["rejected"] == 4
    assert shard_members(out) == {
        "lists": {
            "png": files["d0.png"],
            "txt": b"a zero\nthe digit zero",
            "neg.txt": b"not a zero\na one",
            "neg.png": files["d1.png"],
        },
        "lines": {
            "png": files["d1.png"],
            "txt": b"a one",
            "neg.txt": b"a two\na three",
            "neg.0.png": files["d2.png"],
            "neg.1.png": files["up.PNG"],
            "neg.2.jpg": files["j.jpg"],
        },
        "plain": {"png": files["d2.png"], "txt": b"a two"},
        "single_jpg": {"png": files["d3.png"], "txt": b"a three", "neg.jpg": files["j.jpg"]},
    }
    reasons = rejected(out)
    assert reasons["m.jsonl:5"].startswith("missing negative image") and "gone.png" in reasons["m.jsonl:5"]
    assert reasons["m.jsonl:6"] == "negative image path is outside the manifest's folder"
    assert "broken.png: unreadable image" in reasons["m.jsonl:7"]
    assert reasons["m.jsonl:8"] == "empty caption"


def test_column_negatives_win_over_swapped_ones_which_come_from_the_first_caption(tmp_path, images):
    root, _ = images
    rows = [
        {"key": "own", "image": "d0.png", "caption": "a red cat", "neg": ["mine"]},
        {"key": "swapped", "image": "d1.png", "caption": ["a red cat", "a blue dog"], "neg": None},
    ]
    out = tmp_path / "shards"
    write_pairs(manifest_pairs(write_jsonl(root, rows), negatives_column="neg"), out, progress=False, negatives=3)
    samples = shard_members(out)
    assert samples["own"]["neg.txt"] == b"mine"
    assert samples["swapped"]["neg.txt"] == b"a cat red"  # of "a red cat" alone
    assert samples["swapped"]["txt"] == b"a red cat\na blue dog"


def test_parquet_list_columns(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, files = images
    table = pa.table(
        {
            "image": ["d0.png", "d1.png", "d2.png"],
            "caption": [["zero", "nought"], ["one"], []],
            "negatives": [["not zero"], None, ["x"]],
            "negative_images": [["d3.png", "d4.png"], ["d5.png"], None],
        }
    )
    manifest = root / "m.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "shards"
    pairs = manifest_pairs(manifest, negatives_column="negatives", negative_image_column="negative_images")
    stats = write_pairs(pairs, out, progress=False)
    assert stats["samples"] == 2 and rejected(out) == {"m.parquet:3": "empty caption"}
    assert shard_members(out) == {
        "000000001": {
            "png": files["d0.png"],
            "txt": b"zero\nnought",
            "neg.txt": b"not zero",
            "neg.0.png": files["d3.png"],
            "neg.1.png": files["d4.png"],
        },
        "000000002": {"png": files["d1.png"], "txt": b"one", "neg.png": files["d5.png"]},
    }


def test_a_csv_without_the_named_column_is_a_clear_error(tmp_path, images):
    root, _ = images
    manifest = root / "m.csv"
    manifest.write_text("image,caption\nd0.png,zero\n")
    with pytest.raises(DataError, match="no column 'negs'"):
        write_pairs(manifest_pairs(manifest, negatives_column="negs"), tmp_path / "s", progress=False)


def test_the_cli_passes_the_columns_and_refuses_them_for_a_folder(tmp_path, images):
    root, files = images
    manifest = write_jsonl(root, JSONL_ROWS[:1])
    out = tmp_path / "shards"
    command = ["prep", "manifest", str(manifest), "--out", str(out), "--no-progress", "--workers", "1"]
    assert main([*command, "--negatives-column", "neg", "--negative-image-column", "neg_image"]) == 0
    assert set(shard_members(out)["lists"]) == {"png", "txt", "neg.txt", "neg.png"}
    with pytest.raises(SystemExit):
        main(["prep", "folder", str(root), "--out", str(tmp_path / "f"), "--negatives-column", "neg"])


def test_the_columns_are_part_of_the_sets_identity(tmp_path, images):
    root, _ = images
    manifest = write_jsonl(root, JSONL_ROWS[:3])
    assert "negatives_column" not in manifest_pairs(manifest).identity  # earlier sets keep their identity
    with_columns = manifest_pairs(manifest, negatives_column="neg", negative_image_column="neg_image").identity
    assert with_columns["negatives_column"] == "neg" and with_columns["negative_image_column"] == "neg_image"


def as_codes(text):
    codes = [ord(c) for c in text][:WIDTH]
    return torch.tensor(codes + [0] * (WIDTH - len(codes)))


def as_text(row):
    return "".join(chr(c) for c in row.tolist() if c)


def pixels(image):
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))  # (8, 8): the digits' size


def test_the_training_reader_reads_the_captions_and_negatives_the_prep_wrote(tmp_path, images):
    root, files = images
    out = tmp_path / "shards"
    pairs = manifest_pairs(write_jsonl(root, JSONL_ROWS[:2]), negatives_column="neg", negative_image_column="neg_image")
    write_pairs(pairs, out, progress=False)
    data = DataConfig(
        captions="all", captions_per_sample=2, negatives={"text": "neg.txt", "image": "neg.png"}, negatives_per_sample=2
    )
    inputs = {"image": InputSpec("image", ["png"], pixels), "text": InputSpec("text", ["txt"], as_codes)}
    inputs = caption_inputs(data, inputs)
    inputs.update(negative_inputs(data, {"image": pixels, "text": as_codes}, {"image": "image", "text": "text"}))
    (batch,) = list(build_eval_loader(str(out / "000000.tar"), inputs, batch_size=4))
    assert batch.skipped == 0 and [k.split("#")[1] for k in batch.keys] == ["lists", "lines"]
    captions = [[as_text(row) for row in sample] for sample in batch.inputs["text"]]  # (2, 2, WIDTH)
    assert captions == [["a zero", "the digit zero"], ["a one", "a one"]]
    negative_captions = [[as_text(row) for row in sample] for sample in batch.negatives["text"]]
    assert negative_captions == [["not a zero", "a one"], ["a two", "a three"]]
    negative_images = batch.negatives["image"]  # (2, 2, 8, 8): "lines" reads its numbered PNGs, not the JPEG
    want = [[files["d1.png"]] * 2, [files["d2.png"], files["up.PNG"]]]
    assert negative_images.shape == (2, 2, 8, 8)
    for got, expected in zip(negative_images, want, strict=True):
        assert torch.equal(got, torch.stack([pixels(decode_image(data)) for data in expected]))
