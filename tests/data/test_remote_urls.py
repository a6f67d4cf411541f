"""Shards beyond local paths: webdataset's `pipe:` commands and the URL schemes fsspec opens (tested
with fsspec's own `memory://`; s3://, gs://, az:// go the same way with the user's fsspec plugin)."""

import json

import fsspec
import torch

from mmcl.cli import main
from mmcl.data import InputSpec, build_eval_loader
from mmcl.models import MultiEncoder

from conftest import REPO, tiny_config, tiny_overrides


def keys_and_images(urls):
    """Every sample's key and decoded image tensor, through the eval reader."""
    model = MultiEncoder(tiny_config().model)
    inputs = {"image": InputSpec("image", ["png"], model.preprocessors(train=False)["image"])}
    keys, images = [], []
    for batch in build_eval_loader(urls, inputs, 64):
        keys += [key.split("#", 1)[1] for key in batch.keys]
        images.append(batch.inputs["image"])
    return keys, torch.cat(images)


def test_pipe_and_fsspec_urls_read_the_same_samples_as_the_path(digits_root):
    shard = digits_root / "test" / "0.tar"
    local_keys, local_images = keys_and_images(str(shard))
    with fsspec.open("memory://mmcl-test/digits/0.tar", "wb") as f:
        f.write(shard.read_bytes())
    for url in (f"pipe:cat {shard}", "memory://mmcl-test/digits/0.tar", f"file://{shard}"):
        keys, images = keys_and_images(url)
        assert keys == local_keys and len(keys) == 360, url
        assert torch.equal(images, local_images), url


def test_training_from_a_pipe_command(digits_root, tmp_path):
    """data.train through `pipe:cat ...` (the form of `pipe:aws s3 cp s3://bucket/{000..009}.tar -`)."""
    overrides = tiny_overrides(
        f"pipe:cat {digits_root}/train/{{000000..000001}}.tar",
        **{"run.output_dir": tmp_path, "run.name": "piped", "run.steps": 5, "run.checkpoint_every": 5},
    )
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 0
    logged = [json.loads(line) for line in (tmp_path / "piped" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2, 3, 4, 5]
