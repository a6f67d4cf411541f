"""Negative images through a step and a run: extra image candidates of every caption, embedded by the image
tower with the positives; exact against a float64 reference, through the gradient cache and in validation."""

import json
import math

import pytest
import torch

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl import config as config_lib
from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses import build_loss
from mmcl.train.gradcache import GradCache, plain_backward
from mmcl.train.negatives import HardNegatives
from mmcl.train.trainer import check_config, train

from conftest import tiny_overrides
from test_gradcache import NO_AUTOCAST, assert_same_grads, engine_for, grads, one_layer_model

BATCH, PER_SAMPLE = 6, 2


def batch_with_negative_images(kinds=("image",), seed=3):
    """A batch of B images and captions, and H negatives per sample of each modality in `kinds`."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "image": torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 49000, (BATCH, 16), generator=g),
    }
    negatives = {"image": torch.randn(BATCH, PER_SAMPLE, 3, 32, 32, generator=g, dtype=torch.float64)}
    negatives["text"] = torch.randint(1, 49000, (BATCH, PER_SAMPLE, 16), generator=g)
    return inputs, {m: negatives[m] for m in kinds}


def direction_reference(anchors, candidates, extra, scale, alpha, beta):
    """One direction of HN-NCE (Radenovic et al. 2023) with explicit negatives as extra candidate columns
    (NegCLIP, Yuksekgonul et al. 2023), as float64 loops: anchor i's positive is candidate i, its negatives
    every other candidate and every row of `extra` (each sample's negatives, of every sample);
    loss_i = -log( e^{s_ii} / (alpha e^{s_ii} + sum_j w_ij e^{s_ij}) ), w_ij = N e^{beta s_ij} /
    sum_k e^{beta s_ik} over the N negatives. alpha = 1, beta = 0 is InfoNCE: -log softmax_i."""
    total = 0.0
    for i, anchor in enumerate(anchors):
        scores = [scale * float(anchor @ c) for c in candidates]
        negatives = [s for j, s in enumerate(scores) if j != i] + [scale * float(anchor @ e) for e in extra]
        weights = [math.exp(beta * s) for s in negatives]
        weighted = sum(len(negatives) * w / sum(weights) * math.exp(s) for w, s in zip(weights, negatives, strict=True))
        total -= math.log(math.exp(scores[i]) / (alpha * math.exp(scores[i]) + weighted))
    return total / len(anchors)


def loss_reference(image, text, negatives, scale, alpha=1.0, beta=0.0):
    """The mean of both directions: images against captions and the negative captions; captions against
    images and the negative images. `negatives`: modality -> (B, H, D)."""
    image, text, scale = image.double(), text.double(), float(scale)
    none = torch.zeros(0, image.shape[1], dtype=torch.float64)
    negative_text = negatives["text"].double().flatten(0, 1) if "text" in negatives else none  # (B*H, D)
    negative_image = negatives["image"].double().flatten(0, 1) if "image" in negatives else none
    image_to_text = direction_reference(image, text, negative_text, scale, alpha, beta)
    text_to_image = direction_reference(text, image, negative_image, scale, alpha, beta)
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("kinds", [("image",), ("image", "text")])
@pytest.mark.parametrize("name", ["infonce", "hn_nce"])
def test_loss_through_the_step_equals_the_extra_columns_reference(name, kinds):
    model = one_layer_model()
    cfg = LossConfig(name=name)
    loss_fn = build_loss(cfg)
    inputs, negatives = batch_with_negative_images(kinds)
    extended, with_negatives = HardNegatives(list(kinds), PER_SAMPLE).attach(inputs, negatives, loss_fn)
    assert extended["image"].shape == (BATCH * (1 + PER_SAMPLE), 3, 32, 32)
    through_step = plain_backward(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    with torch.no_grad():  # each negative embedded apart from the batch, then shaped (B, H, D)
        image, text = model.encode("image", inputs["image"]), model.encode("text", inputs["text"])
        embedded = {m: model.encode(m, n.flatten(0, 1)).view(BATCH, PER_SAMPLE, -1) for m, n in negatives.items()}
        scale, bias = model.similarity()
        without = loss_fn({"image": image, "text": text}, scale, bias)["loss"]
    alpha, beta = (cfg.alpha, cfg.beta) if name == "hn_nce" else (1.0, 0.0)
    reference = loss_reference(image, text, embedded, scale, alpha, beta)
    torch.testing.assert_close(float(through_step), reference, rtol=1e-10, atol=0)
    assert float(through_step) > float(without) + 1e-3  # the negative images are scored


@pytest.mark.parametrize("kinds", [("image",), ("image", "text")])
@pytest.mark.parametrize("name", ["infonce", "hcl"])
def test_gradient_cache_equals_plain_backward_with_negative_images(name, kinds):
    loss_fn = build_loss(LossConfig(name=name))
    model = one_layer_model()
    extended, with_negatives = HardNegatives(list(kinds), PER_SAMPLE).attach(
        *batch_with_negative_images(kinds), loss_fn
    )
    plain = plain_backward(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # Image chunks of 4 over 6 positive + 12 negative rows: a chunk straddles positives and negatives.
    cached = GradCache({"image": 4, "text": 5})(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)


def test_gradient_cache_replays_the_patch_masks_of_negative_images():
    """Random patch masking on: the cache equals the same image chunks embedded in one graph from one seed."""
    loss_fn = build_loss(LossConfig(name="infonce"))
    model = one_layer_model(patch_dropout=0.5)
    inputs, negatives = batch_with_negative_images()
    extended, with_negatives = HardNegatives(["image"], PER_SAMPLE).attach(inputs, negatives, loss_fn)
    torch.manual_seed(7)
    cached = GradCache({"image": 4, "text": 5})(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    from_cache = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the image chunks first, in the cache's order: the same masks
    rows = torch.cat([model.encode("image", chunk) for chunk in extended["image"].split(4)])  # (B + B*H, D)
    image, negative_images = rows[:BATCH], rows[BATCH:].view(BATCH, PER_SAMPLE, -1)  # (B*H, D) -> (B, H, D)
    text = model.encode("text", inputs["text"])
    full = loss_fn({"image": image, "text": text}, *model.similarity(), negatives={"image": negative_images})
    full["loss"].backward()
    torch.testing.assert_close(cached, full["loss"].detach(), rtol=1e-12, atol=0)
    assert_same_grads(from_cache, grads(model))


def test_negative_images_the_run_cannot_use_fail_naming_the_key_before_compute(tmp_path):
    (tmp_path / "0.tar").touch()

    def tiny_config(**extra):
        return config_lib.load(None, tiny_overrides(str(tmp_path / "0.tar"), **extra))

    cases = [
        ({"loss.name": "siglip", "model.init_logit_bias": -10.0}, "'data.negatives'.*siglip"),
        ({"data.negatives": "{image: neg.txt}"}, "'data.negatives.image'.*image"),
        ({"data.negatives": "{audio: neg.wav}"}, "'data.negatives.audio'.*not a fed tower"),
        ({"data.optional_modalities": "[image]"}, "'data.negatives.image'.*optional"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config(tiny_config(**{"data.negatives": "{image: neg.png}", **settings}))
    check_config(tiny_config(**{"loss.name": "hn_nce", "data.negatives": "{image: neg.jpg;neg.png, text: neg.txt}"}))


def write_shards_with_negative_images(out, digit_pngs):
    """32 captioned digits, each with two negative images: other digits, in numbered fields."""
    pngs = [png for png, _ in digit_pngs]
    with ShardSetWriter(out, 16) as writer:
        for i, (png, label) in enumerate(digit_pngs[:32]):
            sample = {"__key__": f"s{i:02d}", "png": png, "txt": f"a handwritten {label}"}
            sample.update({"neg.0.png": pngs[(i + 1) % 40], "neg.1.png": pngs[(i + 7) % 40]})
            writer.write(sample)
    return brace_pattern(out, len(writer.sizes))


def test_training_scores_the_negative_images(tmp_path, digit_pngs):
    urls = write_shards_with_negative_images(tmp_path / "shards", digit_pngs)
    images = {"data.negatives": "{image: neg.png}", "data.negatives_per_sample": PER_SAMPLE}
    records = {}
    for name, extra in {"none": {}, "images": images}.items():
        overrides = {"run.output_dir": tmp_path, "run.name": name, "run.steps": 1, "data.batch_size": 8, **extra}
        train(config_lib.load(None, tiny_overrides(urls, **{"data.shuffle_buffer": 0, **overrides})))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if '"loss"' in line]
    # The same first batch and weights: only the 16 extra image candidates differ, and raise the loss.
    assert records["images"][0]["loss"] > records["none"][0]["loss"] + 1e-3


def test_the_validation_loss_scores_the_held_out_negative_images(tmp_path, digit_pngs):
    """val_loss over held-out shards with negative images equals the float64 reference over the same
    held-out batches (the images through the evaluation preprocessing), from the validated weights."""
    from mmcl.checkpoint import state as checkpoints
    from mmcl.data.decode import decode_image, decode_text
    from mmcl.models import load_model
    from mmcl.train.metrics_log import read_records

    urls = write_shards_with_negative_images(tmp_path / "shards", digit_pngs)
    settings = {
        "run.output_dir": tmp_path,
        "run.name": "neg",
        "run.steps": 1,
        "data.batch_size": 8,
        "data.val": urls,
        "eval.val_every": 1,
        "data.negatives": "{image: neg.png}",
        "data.negatives_per_sample": PER_SAMPLE,
    }
    train(config_lib.load(None, tiny_overrides(urls, **settings)))
    run = tmp_path / "neg"
    (val_loss,) = [r["val_loss"] for r in read_records(run / "metrics.jsonl") if "val_loss" in r]
    model = load_model(
        config_lib.from_yaml((run / "config.yaml").read_text()).model,
        checkpoints.load_weights(checkpoints.latest(run)),
        torch.device("cpu"),
    )
    preprocess = model.preprocessors(train=False)
    pngs = [png for png, _ in digit_pngs]
    losses = []
    for start in range(0, 32, 8):  # the held-out batches: the shards' samples in order, 8 at a time
        rows = range(start, start + 8)
        images = torch.stack([preprocess["image"](decode_image(pngs[i])) for i in rows])
        texts = torch.stack(
            [preprocess["text"](decode_text(f"a handwritten {digit_pngs[i][1]}".encode())) for i in rows]
        )
        wrong = [preprocess["image"](decode_image(pngs[(i + k) % 40])) for i in rows for k in (1, 7)]
        with torch.no_grad():
            image, text = model.encode("image", images), model.encode("text", texts)
            negative_images = model.encode("image", torch.stack(wrong)).view(8, PER_SAMPLE, -1)  # (B*H, D) -> (B, H, D)
            scale, _ = model.similarity()
        losses.append(loss_reference(image, text, {"image": negative_images}, scale))
    assert val_loss == pytest.approx(math.fsum(losses) / 4, abs=2e-5)


def test_the_bundled_negative_images_config_passes_the_checks(tmp_path):
    (tmp_path / "0.tar").touch()
    path = config_lib.config_path("digit_pairs_negative_images")
    cfg = config_lib.load(path, [f"data.train={tmp_path / '0.tar'}"])
    check_config(cfg)
    assert cfg.data.negatives == {"image": "neg.png"} and cfg.loss.name == "infonce"
    check_config(
        config_lib.load(path, [f"data.train={tmp_path / '0.tar'}", "data.negatives={text: neg.txt, image: neg.png}"])
    )
