"""K captions per sample through a step (data.captions=all): B*K rows through the text tower, (B, K, D) to
the loss; with hard negatives and presence masks, exact through the gradient cache, under DeepSpeed ZeRO-2
on 2 processes, and through the trainer on 2 processes (validation included)."""

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
from mmcl.train.views import Views, added_rows, check_views

from conftest import tiny_overrides
from launch import assert_ranks_equal_one_process, launch
from test_gradcache import NO_AUTOCAST, assert_same_grads, engine_for, grads, one_layer_model

BATCH, K, H = 6, 3, 2


def batch_with_captions(batch=BATCH, seed=1, dtype=torch.float64):
    """(inputs with K caption rows per sample, (B, H, L) hard negative captions)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "image": torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype),
        "text": torch.randint(1, 49000, (batch, K, 16), generator=g),
    }
    return inputs, {"text": torch.randint(1, 49000, (batch, H, 16), generator=g)}


def multi_positive_reference(image, text, scale, aggregation, text_negatives=()):
    """Multi-positive contrast, float64 loops: each anchor row's positives are all rows of its own sample in
    the other modality; its candidates every row of the other modality (and, for image anchors, the explicit
    text negatives). geometric: the mean over positives of -log p (SupCon's L_out, Khosla et al. 2020);
    arithmetic: -log of the mean p (Poly-View, Shidani et al. 2024)."""
    scale = float(scale.detach())

    def direction(anchors, candidates, extra):
        rows = [(j, c) for j in range(len(candidates)) for c in candidates[j]] + [(-1, e) for e in extra]
        total, count = 0.0, 0
        for i in range(len(anchors)):
            for anchor in anchors[i]:
                scores = [scale * float(anchor.double() @ c.double()) for _, c in rows]
                log_z = math.log(sum(math.exp(s) for s in scores))
                log_p = [scores[n] - log_z for n, (j, _) in enumerate(rows) if j == i]
                if aggregation == "geometric":
                    total -= sum(log_p) / len(log_p)
                else:
                    total -= math.log(sum(math.exp(p) for p in log_p) / len(log_p))
                count += 1
        return total / count

    image_views = [[row] for row in image]  # one view of each image
    extra = [n for sample in text_negatives for n in sample]
    return (direction(image_views, text, extra) + direction(text, image_views, [])) / 2


def embed(model, inputs, negatives):
    """The same embeddings, each sample's captions embedded apart and shaped (B, K, D)."""
    with torch.no_grad():
        image = model.encode("image", inputs["image"])
        text = torch.stack([model.encode("text", captions) for captions in inputs["text"]])  # B x (K, D)
        text_negatives = torch.stack([model.encode("text", n) for n in negatives["text"]])  # B x (H, D)
    return image, text, text_negatives


@pytest.mark.parametrize("aggregation, with_negatives", [("geometric", False), ("arithmetic", True)])
def test_loss_through_the_step_equals_a_float64_recomputation(aggregation, with_negatives):
    model = one_layer_model()
    loss_fn = build_loss(LossConfig(name="multi_positive", positive_aggregation=aggregation))
    inputs, negatives = batch_with_captions()
    flat, step_loss = Views({"text": K}).attach(inputs, loss_fn)
    if with_negatives:
        flat, step_loss = HardNegatives(["text"], H).attach(flat, negatives, step_loss)
    assert flat["text"].shape == (BATCH * (K + H * with_negatives), 16)
    through_step = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    image, text, text_negatives = embed(model, inputs, negatives)
    scale = model.similarity()[0]
    expected = multi_positive_reference(image, text, scale, aggregation, text_negatives if with_negatives else ())
    torch.testing.assert_close(float(through_step), expected, rtol=1e-10, atol=0)
    first_caption = multi_positive_reference(image, text[:, :1], scale, aggregation)
    assert abs(expected - first_caption) > 1e-3  # every caption is scored, not the first alone


def test_presence_masks_score_the_samples_holding_both():
    model = one_layer_model()
    inputs, negatives = batch_with_captions()
    present = torch.tensor([True, True, False, True, False, True])
    loss_fn = build_loss(LossConfig(name="multi_positive"))

    def with_present(embeddings, scale, bias=None, **extra):  # as the trainer binds the batch's masks
        return loss_fn(embeddings, scale, bias, present={"text": present}, **extra)

    flat, step_loss = Views({"text": K}).attach(inputs, with_present)
    flat, step_loss = HardNegatives(["text"], H).attach(flat, negatives, step_loss)
    through_step = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    image, text, text_negatives = embed(model, inputs, negatives)
    kept = multi_positive_reference(image[present], text[present], model.similarity()[0], "geometric", text_negatives)
    torch.testing.assert_close(float(through_step), kept, rtol=1e-10, atol=0)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_gradient_cache_equals_plain_backward_with_views(with_negatives):
    loss_fn = build_loss(LossConfig(name="multi_positive"))
    views, hard = Views({"text": K}), HardNegatives(["text"] if with_negatives else [], H)
    model = one_layer_model()
    inputs, negatives = batch_with_captions()
    flat, step_loss = views.attach(inputs, loss_fn)
    flat, step_loss = hard.attach(flat, negatives, step_loss)
    plain = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # Text chunks of 5 over 18 caption rows (+ 12 negatives): chunks straddle samples and negatives.
    cache = GradCache({"image": 4, "text": 5})
    cached = cache(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    text_rows = BATCH * (K + H * with_negatives)
    assert (
        micro_steps(cache, ["image", "text"], BATCH, added_rows(hard.extra_rows(BATCH), views.extra_rows(BATCH)))
        == len(cache.plan({m: x.split(cache.chunk_sizes[m]) for m, x in flat.items()}))
        == 1 + 1 + math.ceil(text_rows / 5) - 1
    )


def zero2_worker(rank, world, out_dir):
    """One SGD(lr=1) step of this process's half of the global batch, gradient cache on, under ZeRO-2,
    micro-steps counted as the trainer counts them: each weight's change is minus the averaged gradient."""
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
                "loss.name": "multi_positive",
            },
        ),
    )
    half = BATCH // world
    inputs, negatives = batch_with_captions(dtype=torch.float32)
    mine = slice(rank * half, (rank + 1) * half)
    views, hard = Views({"text": K}), HardNegatives(["text"], H)
    flat, step_loss = views.attach({m: x[mine] for m, x in inputs.items()}, build_loss(cfg.loss))
    flat, step_loss = hard.attach(flat, {"text": negatives["text"][mine]}, step_loss)
    cache = GradCache({"image": 2, "text": 4})
    model = one_layer_model().float()
    steps = micro_steps(cache, ["image", "text"], half, added_rows(hard.extra_rows(half), views.extra_rows(half)))
    engine = DeepSpeedEngine(
        model,
        cfg.engine,
        cfg.optim,
        StepShape(1, half, steps),
        torch.device("cpu"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    )
    before = engine.model_state()
    loss = cache(engine, step_loss, flat, NO_AUTOCAST)["loss"]
    engine.step()
    after = engine.model_state()
    torch.save({"loss": loss, "grads": {k: before[k] - after[k] for k in before}}, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_processes_under_zero2_equal_one_process(tmp_path):
    launch(zero2_worker, 2, tmp_path)
    model = one_layer_model().float()
    inputs, negatives = batch_with_captions(dtype=torch.float32)
    flat, step_loss = Views({"text": K}).attach(inputs, build_loss(LossConfig(name="multi_positive")))
    flat, step_loss = HardNegatives(["text"], H).attach(flat, negatives, step_loss)
    loss = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    expected = grads(model)
    assert_ranks_equal_one_process(tmp_path, loss, expected)


def test_captions_a_loss_cannot_score_fail_naming_the_key_before_compute(tmp_path):
    (tmp_path / "0.tar").touch()

    def tiny_config(**extra):
        return config_lib.load(None, tiny_overrides(str(tmp_path / "0.tar"), **extra))

    all_captions = {"data.captions": "all", "data.captions_per_sample": K}
    with pytest.raises(ConfigError, match="'data.captions'.*'infonce'.*multi_positive"):
        check_config(tiny_config(**all_captions))
    distilled = tiny_config(**all_captions, **{"loss.name": "multi_positive", "loss.distill_from": "teacher"})
    with pytest.raises(ConfigError, match="'data.captions'.*distill_from"):
        check_views(distilled, {"image": "image", "text": "text"})
    check_config(tiny_config(**all_captions, **{"loss.name": "multi_positive"}))
    check_config(tiny_config(**{"data.captions": "one"}))  # one caption per sample: any loss


def write_caption_shards(out, digit_pngs):
    """32 digits, each with three phrasings one per line and one negative caption naming another digit."""
    with ShardSetWriter(out, 16) as writer:
        for i, (png, label) in enumerate(digit_pngs[:32]):
            text = f"a handwritten {label}\nthe digit {label}\n{label}\n"
            writer.write({"__key__": f"s{i:02d}", "png": png, "txt": text, "neg.txt": f"a handwritten {9 - label}"})
    return brace_pattern(out, len(writer.sizes))


def train_worker(rank, world, overrides):
    train(config_lib.load(None, overrides))
    torch_dist.destroy_process_group()


def test_two_process_zero2_runs_with_captions_give_the_plain_backwards_steps(tmp_path, digit_pngs):
    """The trainer feeds K captions (and negatives) per sample and sizes DeepSpeed's micro-steps for their
    rows' chunks too: a step taken before the last chunk, or after too few, would change the gradient norm
    and the next step's loss; validation scores the same K captions."""
    urls = write_caption_shards(tmp_path / "shards", digit_pngs)
    records = {}
    for name, cache in (("plain", {}), ("cached", {"engine.grad_cache": "{image: 4, text: 6}"})):
        overrides = {
            "run.output_dir": tmp_path,
            "run.name": name,
            "run.steps": 2,
            "data.batch_size": 8,
            "data.shuffle_buffer": 0,
            "loss.name": "multi_positive",
            "data.captions": "all",
            "data.captions_per_sample": K,
            "data.negatives": "{text: neg.txt}",
            "data.val": urls,
            "eval.val_every": 2,
            "eval.val_batches": 1,
            "engine.backend": "deepspeed",
            "engine.zero_stage": 2,
            **cache,
        }
        launch(train_worker, 2, tiny_overrides(urls, **overrides))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert [r["step"] for r in records["cached"]] == [1, 2] and "val_loss" in records["cached"][1]
    for plain, cached in zip(records["plain"], records["cached"], strict=True):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    assert records["cached"][1]["val_loss"] == pytest.approx(records["plain"][1]["val_loss"], rel=1e-5)
