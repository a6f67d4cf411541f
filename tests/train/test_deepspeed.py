"""DeepSpeed ZeRO on 2 CPU processes: every stage follows plain data parallelism (stage 0) step by step,
with and without the gradient cache, and the gradient cache gives exact gradients with random masking on."""

import json

import pytest
import torch
import torch.distributed as torch_dist

from mmcl import config as config_lib
from mmcl.losses import build_loss
from mmcl.train.engine import DeepSpeedEngine, StepShape
from mmcl.train.gradcache import GradCache
from mmcl.train.trainer import train

from conftest import tiny_overrides
from launch import launch
from test_gradcache import NO_AUTOCAST, one_layer_model

STEPS = 20


def train_worker(rank, world, overrides):
    train(config_lib.load(None, overrides))
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def loss_curves(tmp_path_factory, digits_root):
    out = tmp_path_factory.mktemp("zero")
    curves = {}
    for stage in (0, 1, 2, 3):
        for cached in (False, True):
            name = f"zero{stage}{'-gc' if cached else ''}"
            overrides = tiny_overrides(
                f"{digits_root}/train/{{000000..000005}}.tar",
                **{
                    "run.output_dir": out,
                    "run.name": name,
                    "run.steps": STEPS,
                    "run.checkpoint_every": 1000,
                    "optim.warmup_steps": 2,
                    "optim.lr": 1e-3,
                    "optim.grad_clip": 1.0,
                    "data.batch_size": 16,
                    "engine.backend": "deepspeed",
                    "engine.zero_stage": stage,
                    **({"engine.grad_cache.image": 4, "engine.grad_cache.text": 8} if cached else {}),
                },
            )
            launch(train_worker, 2, overrides)
            records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
            curves[name] = torch.tensor([[r["loss"], r["grad_norm"]] for r in records], dtype=torch.float64)
    return curves


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero0-gc", "zero1-gc", "zero2-gc", "zero3-gc"])
def test_every_stage_follows_plain_data_parallel(loss_curves, name):
    reference = loss_curves["zero0"]
    assert reference.shape == (STEPS, 2)
    assert reference[-1, 0] < reference[0, 0]  # it learns
    torch.testing.assert_close(loss_curves[name][:, 0], reference[:, 0], rtol=0, atol=1e-4)  # loss
    torch.testing.assert_close(loss_curves[name][:, 1], reference[:, 1], rtol=1e-3, atol=1e-4)  # grad norm


def exact_gradient_worker(rank, world, stage, out_dir):
    """One SGD(lr=1) step from identical weights: the change of each weight is minus its gradient."""
    cfg = config_lib.load(
        None,
        tiny_overrides(
            "unused.tar",
            **{
                "engine.backend": "deepspeed",
                "engine.zero_stage": stage,
                "optim.grad_clip": 0.0,
                "data.batch_size": 12,
            },
        ),
    )
    loss_fn = build_loss(cfg.loss)
    chunks = {"image": 5, "text": 3}
    g = torch.Generator().manual_seed(10 + rank)
    inputs = {"image": torch.randn(12, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (12, 16), generator=g)}
    results = {}
    for mode in ("full_graph", "grad_cache"):
        model = one_layer_model(patch_dropout=0.5).float()
        cache = GradCache(chunks)
        steps = cache.micro_steps(["image", "text"], 12) if mode == "grad_cache" else 1
        engine = DeepSpeedEngine(
            model,
            cfg.engine,
            cfg.optim,
            StepShape(cfg.run.steps, 12, steps),
            torch.device("cpu"),
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        )
        before = engine.model_state()
        torch.manual_seed(123 + rank)
        if mode == "grad_cache":
            cache(engine, loss_fn, inputs, NO_AUTOCAST)
        else:  # the same chunks in one graph: the same random masks, one backward
            embeddings = {
                m: torch.cat([engine.forward({m: c})[0][m] for c in inputs[m].split(chunks[m])]) for m in chunks
            }
            _, scale, bias = engine.forward({})
            engine.backward(loss_fn(embeddings, scale, bias)["loss"])
        after = engine.model_state()
        results[mode] = {k: before[k] - after[k] for k in before}  # = the averaged gradient
    torch.save(results, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_grad_cache_is_exact_under_zero_with_random_masking(tmp_path, stage):
    launch(exact_gradient_worker, 2, stage, tmp_path)
    results = torch.load(tmp_path / "0.pt")
    grad_cache, full = results["grad_cache"], results["full_graph"]
    assert any(v.abs().sum() > 0 for v in full.values())
    for name in full:
        torch.testing.assert_close(grad_cache[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
