"""Hard negatives from the batch to the loss: embedded by their tower with the positives, handed to the
loss as `negatives=`; exact through the gradient cache and under DeepSpeed ZeRO-2 on 2 processes."""

import json
import math

import pytest
import torch
import torch.distributed as torch_dist

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl import config as config_lib
from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses import build_loss
from mmcl.train.engine import DeepSpeedEngine, StepShape
from mmcl.train.gradcache import GradCache, micro_steps, plain_backward
from mmcl.train.negatives import HardNegatives
from mmcl.train.trainer import check_config, train

from conftest import tiny_overrides
from launch import launch
from test_gradcache import NO_AUTOCAST, assert_same_grads, engine_for, grads, one_layer_model

BATCH, PER_SAMPLE = 6, 2


def batch_with_negatives(batch=BATCH, seed=1, dtype=torch.float64, kinds=("text",)):
    """A batch and H negatives per sample of each modality in `kinds` (the text ones drawn first)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "image": torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype),
        "text": torch.randint(1, 49000, (batch, 16), generator=g),
    }
    negatives = {"text": torch.randint(1, 49000, (batch, PER_SAMPLE, 16), generator=g)}
    negatives["image"] = torch.randn(batch, PER_SAMPLE, 3, 32, 32, generator=g, dtype=dtype)
    return inputs, {m: negatives[m] for m in kinds}


def infonce_reference(image, text, text_negatives, scale):
    """CLIP's symmetric InfoNCE with explicit text negatives as extra candidates of every image anchor
    (NegCLIP, Yuksekgonul et al. 2023), written as float64 loops over rows."""
    image, text, text_negatives = image.double(), text.double(), text_negatives.double().flatten(0, 1)
    scale, n = float(scale), image.shape[0]
    image_to_text = text_to_image = 0.0
    for i in range(n):
        candidates = [math.exp(scale * float(image[i] @ text[j])) for j in range(n)]
        candidates += [math.exp(scale * float(image[i] @ neg)) for neg in text_negatives]
        image_to_text -= math.log(math.exp(scale * float(image[i] @ text[i])) / sum(candidates))
        denominator = sum(math.exp(scale * float(text[i] @ image[j])) for j in range(n))
        text_to_image -= math.log(math.exp(scale * float(text[i] @ image[i])) / denominator)
    return (image_to_text / n + text_to_image / n) / 2


def test_loss_through_the_step_equals_the_loss_on_independently_embedded_negatives():
    model = one_layer_model()
    loss_fn = build_loss(LossConfig(name="infonce"))
    inputs, negatives = batch_with_negatives()
    extended, with_negatives = HardNegatives(["text"], PER_SAMPLE).attach(inputs, negatives, loss_fn)
    assert extended["text"].shape == (BATCH * (1 + PER_SAMPLE), 16)
    through_step = plain_backward(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    with torch.no_grad():  # embedded apart from the positives, then shaped (B, H, D)
        image, text = model.encode("image", inputs["image"]), model.encode("text", inputs["text"])
        text_negatives = model.encode("text", negatives["text"].flatten(0, 1)).view(BATCH, PER_SAMPLE, -1)
        scale, bias = model.similarity()
        direct = loss_fn({"image": image, "text": text}, scale, bias, negatives={"text": text_negatives})["loss"]
        without = loss_fn({"image": image, "text": text}, scale, bias)["loss"]
    torch.testing.assert_close(through_step, direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        float(through_step), infonce_reference(image, text, text_negatives, scale), rtol=1e-10, atol=0
    )
    assert float(through_step) > float(without) + 1e-3  # the negatives are scored


@pytest.mark.parametrize("name", ["infonce", "hn_nce", "multi_positive"])
def test_gradient_cache_equals_plain_backward_with_negatives(name):
    loss_fn = build_loss(LossConfig(name=name))
    hard = HardNegatives(["text"], PER_SAMPLE)
    model = one_layer_model()
    extended, with_negatives = hard.attach(*batch_with_negatives(), loss_fn)
    plain = plain_backward(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # Text chunks of 5 over 6 positive + 12 negative rows: a chunk straddles positives and negatives.
    cache = GradCache({"image": 4, "text": 5})
    cached = cache(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    assert (
        micro_steps(cache, ["image", "text"], BATCH, hard.extra_rows(BATCH))
        == len(cache.plan({m: x.split(cache.chunk_sizes[m]) for m, x in extended.items()}))
        == 1 + 1 + 3
    )


def test_gradient_cache_replays_the_rng_with_negatives():
    """Random patch masking on: the cache equals the same chunks embedded in one graph from one seed."""
    loss_fn = build_loss(LossConfig(name="hcl"))
    model = one_layer_model(patch_dropout=0.5)
    inputs, negatives = batch_with_negatives()
    extended, with_negatives = HardNegatives(["text"], PER_SAMPLE).attach(inputs, negatives, loss_fn)
    torch.manual_seed(7)
    cached = GradCache({"image": 4, "text": 5})(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    from_cache = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the image chunks are embedded first, in the cache's order: the same masks
    image = torch.cat([model.encode("image", chunk) for chunk in inputs["image"].split(4)])
    text = model.encode("text", inputs["text"])  # the text tower draws nothing at random
    text_negatives = model.encode("text", negatives["text"].flatten(0, 1)).view(BATCH, PER_SAMPLE, -1)
    full = loss_fn({"image": image, "text": text}, *model.similarity(), negatives={"text": text_negatives})["loss"]
    full.backward()
    torch.testing.assert_close(cached, full.detach(), rtol=1e-12, atol=0)
    assert_same_grads(from_cache, grads(model))


def test_a_loss_without_negatives_fails_naming_the_key_before_compute(tmp_path):
    (tmp_path / "0.tar").touch()

    def tiny_config(**extra):
        return config_lib.load(None, tiny_overrides(str(tmp_path / "0.tar"), **extra))

    cfg = tiny_config(**{"loss.name": "siglip", "model.init_logit_bias": -10.0, "data.negatives": "{text: neg.txt}"})
    with pytest.raises(ConfigError, match="'data.negatives'.*siglip"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="data.negatives_per_sample"):
        check_config(tiny_config(**{"data.negatives": "{text: neg.txt}", "data.negatives_per_sample": 0}))
    check_config(tiny_config(**{"loss.name": "hn_nce", "data.negatives": "{text: neg.txt}"}))


def zero2_worker(rank, world, out_dir, kinds=("text",)):
    """One SGD(lr=1) step of this process's half of the global batch, gradient cache on, under ZeRO-2:
    the change of each weight is minus the gradient averaged over the processes. `kinds`: the
    modalities with negatives."""
    cfg = config_lib.load(
        None,
        tiny_overrides(
            "unused.tar",
            **{
                "engine.backend": "deepspeed",
                "engine.zero_stage": 2,
                "optim.grad_clip": 0.0,
                "optim.warmup_steps": 0,
                "optim.schedule": "constant",
            },
        ),
    )
    half = BATCH // world
    inputs, negatives = batch_with_negatives(dtype=torch.float32, kinds=kinds)
    mine = slice(rank * half, (rank + 1) * half)
    hard = HardNegatives(list(kinds), PER_SAMPLE)
    extended, with_negatives = hard.attach(
        {m: x[mine] for m, x in inputs.items()}, {m: x[mine] for m, x in negatives.items()}, build_loss(cfg.loss)
    )
    cache = GradCache({"image": 2, "text": 4})
    model = one_layer_model().float()
    steps = micro_steps(cache, ["image", "text"], half, hard.extra_rows(half))
    engine = DeepSpeedEngine(
        model,
        cfg.engine,
        cfg.optim,
        StepShape(1, half, steps),
        torch.device("cpu"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    before = engine.model_state()
    loss = cache(engine, with_negatives, extended, NO_AUTOCAST)["loss"]
    engine.step()
    after = engine.model_state()
    torch.save({"loss": loss, "grads": {k: before[k] - after[k] for k in before}}, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("kinds", [("text",), ("image", "text")], ids=["captions", "images_and_captions"])
def test_two_processes_under_zero2_equal_one_process(tmp_path, kinds):
    launch(zero2_worker, 2, tmp_path, kinds)
    model = one_layer_model().float()
    inputs, negatives = batch_with_negatives(dtype=torch.float32, kinds=kinds)
    loss_fn = build_loss(LossConfig(name="infonce"))
    extended, with_negatives = HardNegatives(list(kinds), PER_SAMPLE).attach(inputs, negatives, loss_fn)
    loss = plain_backward(engine_for(model), with_negatives, extended, NO_AUTOCAST)["loss"]
    expected = grads(model)
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=0)
    for rank in ranks:
        assert rank["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            # float32 sums in another order: an entry that cancels to near zero (ln_post.bias's, with the
            # negative images' rows) keeps an error of a few 1e-6 of the tensor's largest entry.
            atol = max(1e-6, 1e-5 * float(grad.abs().max()))
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=atol, msg=name)


def write_digit_shards(out, digit_pngs):
    """32 captioned digits, each with two negative captions naming other digits."""
    with ShardSetWriter(out, 16) as writer:
        for i, (png, label) in enumerate(digit_pngs[:32]):
            sample = {"__key__": f"s{i:02d}", "png": png, "txt": f"a handwritten {label}"}
            sample["neg.txt"] = f"a handwritten {(label + 1) % 10}\na handwritten {(label + 5) % 10}\n".encode()
            writer.write(sample)
    return brace_pattern(out, len(writer.sizes))


def test_training_runs_score_the_shards_negatives_and_the_cache_matches_plain(tmp_path, digit_pngs):
    urls = write_digit_shards(tmp_path / "shards", digit_pngs)
    negatives = {"data.negatives": "{text: neg.txt}", "data.negatives_per_sample": PER_SAMPLE}
    runs = {"none": {}, "plain": negatives, "cached": {**negatives, "engine.grad_cache": "{image: 4, text: 6}"}}
    records = {}
    for name, extra in runs.items():
        overrides = {"run.output_dir": tmp_path, "run.name": name, "run.steps": 2, "data.batch_size": 8, **extra}
        train(config_lib.load(None, tiny_overrides(urls, **{"data.shuffle_buffer": 0, **overrides})))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert [r["step"] for r in records["plain"]] == [1, 2]
    # The same first batch and weights: only the 16 extra text candidates differ, and raise the loss.
    assert records["plain"][0]["loss"] > records["none"][0]["loss"] + 1e-3
    for plain, cached in zip(records["plain"], records["cached"], strict=True):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_a_run_over_weighted_sources_scores_their_negatives(tmp_path, digit_pngs):
    urls = write_digit_shards(tmp_path / "shards", digit_pngs)
    sources = {"data.train": "''", "data.sources": f"[{{urls: '{urls}', weight: 1}}, {{urls: '{urls}', weight: 2}}]"}
    negatives = {"data.negatives": "{text: neg.txt}", "data.negatives_per_sample": PER_SAMPLE}
    first_loss = {}
    for name, extra in {"none": sources, "negatives": {**sources, **negatives}}.items():
        overrides = {"run.output_dir": tmp_path, "run.name": name, "run.steps": 1, "data.batch_size": 8, **extra}
        train(config_lib.load(None, tiny_overrides(urls, **{"data.shuffle_buffer": 0, **overrides})))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        first_loss[name] = [json.loads(line) for line in lines if '"loss"' in line][0]["loss"]
    # The same mixed first batch and weights: only the extra text candidates differ, and raise the loss.
    assert first_loss["negatives"] > first_loss["none"] + 1e-3


def train_worker(rank, world, overrides):
    train(config_lib.load(None, overrides))
    torch_dist.destroy_process_group()


def test_two_process_zero3_runs_with_negatives_give_the_plain_backwards_steps(tmp_path, digit_pngs):
    """The trainer sizes DeepSpeed's micro-steps for the negatives' chunks too: a step taken before the
    last chunk, or after too few, would change the gradient norm and the next step's loss."""
    urls = write_digit_shards(tmp_path / "shards", digit_pngs)
    records = {}
    for name, cache in (("plain", {}), ("cached", {"engine.grad_cache": "{image: 4, text: 6}"})):
        overrides = {
            "run.output_dir": tmp_path,
            "run.name": name,
            "run.steps": 2,
            "data.batch_size": 8,
            "data.shuffle_buffer": 0,
            "data.negatives": "{text: neg.txt}",
            "data.negatives_per_sample": PER_SAMPLE,
            "engine.backend": "deepspeed",
            "engine.zero_stage": 3,
            **cache,
        }
        launch(train_worker, 2, tiny_overrides(urls, **overrides))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert [r["step"] for r in records["cached"]] == [1, 2]
    for plain, cached in zip(records["plain"], records["cached"], strict=True):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_the_validation_loss_scores_the_held_out_negatives(tmp_path, digit_pngs):
    """val_loss over held-out shards with negative captions equals the float64 NegCLIP reference over the
    same held-out batches, from the weights of the step that validated."""
    from mmcl.checkpoint import state as checkpoints
    from mmcl.data.decode import decode_image, decode_text
    from mmcl.models import load_model
    from mmcl.train.metrics_log import read_records

    urls = write_digit_shards(tmp_path / "shards", digit_pngs)
    settings = {
        "run.output_dir": tmp_path,
        "run.steps": 1,
        "data.batch_size": 8,
        "data.val": urls,
        "eval.val_every": 1,
        "data.negatives": "{text: neg.txt}",
        "data.negatives_per_sample": PER_SAMPLE,
    }
    train(config_lib.load(None, tiny_overrides(urls, **{"run.name": "neg", **settings})))
    (val_loss,) = [r["val_loss"] for r in read_records(tmp_path / "neg" / "metrics.jsonl") if "val_loss" in r]
    run = tmp_path / "neg"
    model = load_model(
        config_lib.from_yaml((run / "config.yaml").read_text()).model,
        checkpoints.load_weights(checkpoints.latest(run)),
        torch.device("cpu"),
    )
    preprocess = model.preprocessors(train=False)
    held_out = sorted((i, png, label) for i, (png, label) in enumerate(digit_pngs[:32]))
    losses = []
    for start in range(0, 32, 8):  # the held-out batches: the shards' samples in order, 8 at a time
        rows = held_out[start : start + 8]
        images = torch.stack([preprocess["image"](decode_image(png)) for _, png, _ in rows])
        texts = torch.stack([preprocess["text"](decode_text(f"a handwritten {label}".encode())) for *_, label in rows])
        wrong = [f"a handwritten {(label + k) % 10}" for *_, label in rows for k in (1, 5)]
        with torch.no_grad():
            image, text = model.encode("image", images), model.encode("text", texts)
            text_negatives = model.encode("text", torch.stack([preprocess["text"](w) for w in wrong]))
            scale, _ = model.similarity()
        losses.append(infonce_reference(image, text, text_negatives.view(8, PER_SAMPLE, -1), scale))
    assert val_loss == pytest.approx(math.fsum(losses) / 4, abs=2e-5)
    # Without negatives the same held-out batches score lower: the negatives were counted.
    train(config_lib.load(None, tiny_overrides(urls, **{"run.name": "plain", **settings, "data.negatives": "{}"})))
    (plain,) = [r["val_loss"] for r in read_records(tmp_path / "plain" / "metrics.jsonl") if "val_loss" in r]
    assert plain < val_loss - 1e-3
