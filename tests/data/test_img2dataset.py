"""Shards as img2dataset writes them, read as they are: {00000..N}.tar of jpg/txt/json per key, with its
.parquet and _stats.json beside each tar, and the caption taken from a key of the json when configured."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep.digits import split_digits
from mmcl.cli import main
from mmcl.data.decode import SampleError, check_fields, decode_field
from mmcl.errors import DataError

from conftest import REPO, tiny_overrides

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_img2dataset_shards(out, images, labels, per_shard):
    """img2dataset's output layout: keys are 9-digit numbers (shard id, then index), each sample a jpg,
    a txt and a json of its metadata; <shard>.parquet and <shard>_stats.json beside each tar. The txt
    holds the alt text as crawled (here a useless one); the json's "caption" the caption to train on."""
    out.mkdir(parents=True)
    for shard in range(0, len(images), per_shard):
        shard_id = shard // per_shard
        rows = []
        with wds.TarWriter(str(out / f"{shard_id:05d}.tar")) as tar:
            for i in range(shard, min(shard + per_shard, len(images))):
                key = f"{shard_id:05d}{i - shard:04d}"
                buffer = io.BytesIO()
                Image.fromarray((images[i] * 255 / 16).astype("uint8"), mode="L").convert("RGB").save(buffer, "JPEG")
                meta = {"url": f"https://example.org/{i}.jpg", "key": key, "status": "success", "error_message": None,
                        "width": 8, "height": 8, "caption": f"a handwritten {WORDS[labels[i]]}"}  # fmt: skip
                tar.write({"__key__": key, "jpg": buffer.getvalue(), "txt": "image", "json": json.dumps(meta)})
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard_id:05d}.parquet")
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return f"{out}/{{00000..{(len(images) - 1) // per_shard:05d}}}.tar"


def test_a_json_key_is_a_field():
    sample = {"json": json.dumps({"caption": "a cat", "width": 8}).encode(), "txt": b"image"}
    assert decode_field(sample, "text", ["json:caption"]) == "a cat"
    assert decode_field({"txt": b"image"}, "text", ["json:caption", "txt"]) == "image"  # the next field in order
    with pytest.raises(SampleError, match="no text or number under 'title'"):
        decode_field(sample, "text", ["json:title"])
    with pytest.raises(SampleError, match="not valid JSON"):
        decode_field({"json": b"{broken"}, "text", ["json:caption"])
    with pytest.raises(DataError, match="only a json field has keys"):
        check_fields("text", ["txt:caption"])


def test_training_from_img2dataset_shards_with_the_caption_from_the_json(tmp_path, digits_root):
    """The digits as an img2dataset set; the model learns from the json captions (its txt names nothing),
    and reads the digits above chance."""
    digits, train_idx, _ = split_digits(0.2, seed=0)  # the training images of digits_root: none held out
    urls = write_img2dataset_shards(tmp_path / "img2dataset", digits.images[train_idx], digits.target[train_idx], 500)
    overrides = tiny_overrides(
        urls,
        **{
            "run.output_dir": tmp_path / "runs",
            "run.name": "img2dataset",
            "run.steps": 200,
            "run.checkpoint_every": 200,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 10,
            "data.fields.image": "jpg;png",  # jpg in the img2dataset shards, png in the held-out digits
            "data.fields.text": "json:caption",
            "eval.datasets": f"[{digits_root}]",
            "eval.linear_probe.mode": "none",
        },
    )
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 0
    results = json.loads((tmp_path / "runs" / "img2dataset" / "eval.json").read_text())[digits_root.name]
    assert results["acc1"] > 0.3  # chance: 0.1
