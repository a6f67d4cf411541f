"""K augmented views per sample (data.views): independent draws of the training policy, reproducible from
the stream's seed, scored by multi_positive through the gradient cache; validation reads one plain view."""

import io
import json
from itertools import islice

import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl import config as config_lib
from mmcl.data import TrainStream
from mmcl.errors import ConfigError
from mmcl.train.trainer import check_config, stream_inputs, train
from mmcl.train.views import check_views

from conftest import tiny_config, tiny_model, tiny_overrides

K = 3
POLICY = {"data.augment.image.crop_scale": "[0.5,1.0]", "data.augment.image.color_jitter_p": 0.8}


def write_shards(out, digit_pngs):
    with ShardSetWriter(out, 16) as writer:
        for i, (png, label) in enumerate(digit_pngs[:32]):
            writer.write({"__key__": f"s{i:02d}", "png": png, "txt": f"a handwritten {label}"})
    return brace_pattern(out, len(writer.sizes))


def first_batches(urls, seed, train_inputs=True, n=2):
    cfg = tiny_config(**{**POLICY, "data.views": f"{{image: {K}}}"})
    inputs = stream_inputs(tiny_model(), cfg, ["image", "text"], train=train_inputs)
    return list(islice(TrainStream(urls, inputs, 8, 0, 0, seed), n))


def test_the_k_views_of_a_sample_differ_and_repeat_from_the_seed(tmp_path, digit_pngs):
    urls = write_shards(tmp_path, digit_pngs)
    batches = first_batches(urls, seed=0)
    images = batches[0].inputs["image"]
    assert images.shape == (8, K, 3, 32, 32) and batches[0].inputs["text"].shape == (8, 16)
    for sample in images:  # each view its own draw of the policy
        assert all(not torch.equal(sample[a], sample[b]) for a in range(K) for b in range(a + 1, K))
    again, other = first_batches(urls, seed=0), first_batches(urls, seed=1)
    assert all(torch.equal(a.inputs["image"], b.inputs["image"]) for a, b in zip(batches, again, strict=True))
    assert [b.keys for b in other] == [b.keys for b in batches]  # read in order: only the draws differ
    assert not torch.equal(other[0].inputs["image"], images)
    held_out = first_batches(urls, seed=0, train_inputs=False)[0]  # validation's inputs: one plain view
    first = Image.open(io.BytesIO(digit_pngs[0][0]))
    assert held_out.inputs["image"].shape == (8, 3, 32, 32)
    assert torch.equal(held_out.inputs["image"][0], image_transform(32, is_train=False)(first))


def test_views_the_setup_cannot_use_fail_naming_the_key(tmp_path):
    (tmp_path / "0.tar").touch()

    def config(**extra):
        return config_lib.load(None, tiny_overrides(str(tmp_path / "0.tar"), **extra))

    with pytest.raises(ConfigError, match="'data.views'.*'infonce'.*multi_positive"):
        check_config(config(**{"data.views": "{image: 2}"}))
    with pytest.raises(ConfigError, match="'data.views.text'.*data.captions=all"):
        check_config(config(**{"data.views": "{text: 2}", "loss.name": "multi_positive"}))
    with pytest.raises(ConfigError, match="'data.views.audio': not a fed tower"):
        check_config(config(**{"data.views": "{audio: 2}", "loss.name": "multi_positive"}))
    with pytest.raises(ConfigError, match="'data.views.image': must be at least 1"):
        check_config(config(**{"data.views": "{image: 0}"}))
    distilled = config(**{"data.views": "{image: 2}", "loss.name": "multi_positive", "loss.distill_from": "x"})
    with pytest.raises(ConfigError, match="'data.views'.*distill_from"):
        check_views(distilled, {"image": "image", "text": "text"})
    check_config(config(**{"data.views": "{image: 2}", "loss.name": "multi_positive"}))
    check_config(config(**{"data.views": "{image: 1}"}))  # one view: any loss


def test_training_scores_k_views_and_the_gradient_cache_agrees(tmp_path, digit_pngs):
    urls = write_shards(tmp_path / "shards", digit_pngs)
    # The K views also positives of each other (loss.view_weight), as SLIP trains.
    views = {**POLICY, "loss.name": "multi_positive", "data.views": f"{{image: {K}}}", "loss.view_weight": 0.5}
    runs = {
        "one": {**POLICY, "loss.name": "multi_positive"},
        "plain": {**views, "data.val": urls, "eval.val_every": 1, "eval.val_batches": 1},
        "cached": {**views, "engine.grad_cache": "{image: 5, text: 3}"},  # chunks straddle samples' views
    }
    records = {}
    for name, extra in runs.items():
        overrides = {"run.output_dir": tmp_path, "run.name": name, "run.steps": 2, "data.batch_size": 8, **extra}
        train(config_lib.load(None, tiny_overrides(urls, **{"data.shuffle_buffer": 0, **overrides})))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert [r["step"] for r in records["plain"]] == [1, 2] and "val_loss" in records["plain"][0]
    assert "image-image" in records["plain"][0] and "image-image" not in records["one"][0]
    # The same weights and samples at step 1: one view against K.
    assert abs(records["plain"][0]["loss"] - records["one"][0]["loss"]) > 1e-3
    for plain, cached in zip(records["plain"], records["cached"], strict=True):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
