"""fp16 with dynamic loss scaling: an overflowing step is skipped (weights bitwise unchanged), the scale
halves (after DeepSpeed's hysteresis) and training goes on; overflows do not stop a run but NaN losses
do; the gradient cache stays exact under the scale; a run's loss falls and a resume restores the scale;
DeepSpeed gets its own fp16 section and holds fp16 weights."""

import json
import os

import pytest
import torch
import torch.distributed as torch_dist

from mmcl import config as config_lib
from mmcl.config import LossConfig
from mmcl.data import Batch
from mmcl.losses import build_loss
from mmcl.train.engine import DeepSpeedEngine, StepShape, TorchEngine, deepspeed_config
from mmcl.train.gradcache import GradCache, plain_backward
from mmcl.train.precision import DynamicLossScale, build_autocast
from mmcl.train.run_state import RunState, health_problem
from mmcl.train.step import train_step

from conftest import tiny_config, tiny_overrides
from launch import launch
from test_gradcache import batch, one_layer_model

CPU = torch.device("cpu")
POWER = 8  # the initial scale 2**8 holds these gradients (their norm ~100); DeepSpeed's 2**16 overflows at first
FP16 = build_autocast("fp16", CPU)


def settings(**scale):
    return tiny_config(
        **{
            "engine.precision": "fp16",
            "optim.warmup_steps": 0,
            "optim.schedule": "constant",
            "optim.lr": 1e-3,
            **{f"engine.loss_scale.{k}": v for k, v in scale.items()},
        }
    )


def fp16_engine(model, **scale):
    cfg = settings(**{"initial_scale_power": POWER, **scale})
    return TorchEngine(model, cfg.optim, cfg.run.steps, loss_scale=DynamicLossScale(cfg.engine.loss_scale, CPU))


def inputs32():
    return {m: x.float() if x.is_floating_point() else x for m, x in batch().items()}


def overflowing(param):
    """An Inf in one parameter's gradient: the scaled gradients overflowed (the hook returns the handle)."""
    return param.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("hysteresis, scales", [(1, [1, 1, 1 / 2, 1 / 4, 1 / 4]), (2, [1, 1, 1, 1 / 2, 1 / 2])])
def test_an_overflow_skips_its_step_lowers_the_scale_and_training_goes_on(hysteresis, scales):
    model = one_layer_model().float()
    engine = fp16_engine(model, hysteresis=hysteresis)
    loss_fn, inputs = build_loss(LossConfig()), inputs32()
    param = model.towers["image"].encoder.conv1.weight
    metrics = [train_step(engine, loss_fn, plain_backward, inputs, FP16)]
    fp32 = one_layer_model().float()
    plain_backward(TorchEngine(fp32, settings().optim, 10), loss_fn, inputs, torch.autocast("cpu", enabled=False))
    fp32_norm = torch.nn.utils.get_total_norm([p.grad for p in fp32.parameters() if p.grad is not None]).item()
    assert metrics[0]["grad_norm"] == pytest.approx(fp32_norm, rel=0.05)  # the true (unscaled) gradients' norm
    for _ in range(2):  # steps 2 and 3 overflow
        before, adam_steps = weights(model), engine.optimizer.state[param]["step"].clone()
        handle = overflowing(param)
        metrics.append(train_step(engine, loss_fn, plain_backward, inputs, FP16))
        handle.remove()
        after = weights(model)
        assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: the update was skipped
        assert torch.equal(engine.optimizer.state[param]["step"], adam_steps)
        assert metrics[-1]["overflow"] == 1.0 and metrics[-1]["nonfinite"] == 0.0
    before = weights(model)
    metrics.append(train_step(engine, loss_fn, plain_backward, inputs, FP16))
    metrics.append(train_step(engine, loss_fn, plain_backward, inputs, FP16))
    assert [m["loss_scale"] for m in metrics] == [2.0**POWER * s for s in scales]
    assert [m["overflow"] for m in metrics] == [0, 1, 1, 0, 0]
    assert not torch.equal(
        before["towers.image.encoder.conv1.weight"], weights(model)["towers.image.encoder.conv1.weight"]
    )
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it goes on learning


def test_overflows_do_not_stop_a_run_but_nan_losses_do():
    model = one_layer_model().float()
    engine = fp16_engine(model, hysteresis=1)
    loss_fn, inputs = build_loss(LossConfig()), inputs32()
    state, limit, rows = RunState(), 3, Batch(inputs, keys=[f"sample{i}" for i in range(12)])
    handle = overflowing(model.towers["text"].encoder.token_embedding.weight)
    for _ in range(limit + 2):
        state.advance(rows, train_step(engine, loss_fn, plain_backward, inputs, FP16))
        assert health_problem(state, limit, 0.1) is None
    handle.remove()
    assert state.overflow_steps == limit + 2 and state.nonfinite_steps == 0
    nan_inputs = {**inputs, "image": torch.full_like(inputs["image"], float("nan"))}
    for _ in range(limit):
        state.advance(rows, train_step(engine, loss_fn, plain_backward, nan_inputs, FP16))
    assert state.nonfinite_steps == limit and "NaN/Inf" in health_problem(state, limit, 0.1)


def test_an_overflow_at_the_floor_counts_as_nonfinite():
    model = one_layer_model().float()
    engine = fp16_engine(model, initial_scale_power=0, hysteresis=1)  # the scale starts at the floor, 1
    handle = overflowing(model.towers["image"].encoder.conv1.weight)
    metrics = train_step(engine, build_loss(LossConfig()), plain_backward, inputs32(), FP16)
    handle.remove()
    assert metrics["loss_scale"] == 1.0 and metrics["nonfinite"] == 1.0 and metrics["overflow"] == 0.0


def test_grad_cache_is_exact_under_fp16_loss_scaling():
    """The gradient of a batch-mean loss w.r.t. one embedding entry shrinks as 1/B. Multiplying the loss by
    1e-6 puts those entries at ~1e-8..1e-6, where a batch of some 10^5 puts them: below fp16's smallest
    normal number (6e-5) and partly below its smallest subnormal (6e-8). Unscaled, they are lost when cast
    to fp16; scaled, they are not.

    fp16 itself moves every gradient off the float64 one (the plain backward by ~10% on some parameters,
    from its activations' 11-bit precision), and chunking changes how its matrix products round. So the
    test is relative: per parameter, the cache's distance to the float64 gradient is at most 1.25 times
    the plain fp16 backward's (+1e-3), and the two differ by under 5% of the gradient's norm."""
    loss_fn = build_loss(LossConfig())

    def small_loss(*args, **kwargs):
        return {name: 1e-6 * value for name, value in loss_fn(*args, **kwargs).items()}

    def gradients(backward, autocast=FP16, dtype=torch.float32):
        model = one_layer_model().to(dtype)
        engine = fp16_engine(model, initial_scale_power=16)
        backward(
            engine, small_loss, {m: x.to(dtype) if x.is_floating_point() else x for m, x in batch().items()}, autocast
        )
        scale = engine.loss_scale.scaler.get_scale()
        return {n: p.grad.double() / scale for n, p in model.named_parameters() if p.grad is not None}

    reference = gradients(plain_backward, torch.autocast("cpu", enabled=False), torch.float64)
    plain = gradients(plain_backward)
    cached = gradients(GradCache({"image": 5, "text": 4}))
    assert plain.keys() == cached.keys() == reference.keys()
    for name, want in reference.items():
        plain_error = (plain[name] - want).norm() / want.norm()
        cached_error = (cached[name] - want).norm() / want.norm()
        assert cached_error <= 1.25 * plain_error + 1e-3, (name, cached_error, plain_error)
        assert (cached[name] - plain[name]).norm() < 0.05 * want.norm(), name


def run_fp16(out, name, steps, **extra):
    from mmcl.train.trainer import train

    overrides = tiny_overrides(
        "unused.tar",
        **{
            "run.output_dir": out,
            "run.name": name,
            "run.steps": steps,
            "run.checkpoint_every": 4,
            "data.batch_size": 24,
            "model.embed_dim": 16,
            "model.towers.image.options": "{layers: 1, width: 32, head_width: 16}",
            "model.towers.text.options": "{layers: 1, width: 32, heads: 2}",
            "optim.warmup_steps": 0,
            "optim.schedule": "constant",
            "optim.lr": 2e-3,
            "engine.precision": "fp16",
            "engine.loss_scale.initial_scale_power": 10,
            "engine.loss_scale.loss_scale_window": 2,  # the scale doubles every 2 steps: resume must restore it
            **extra,
        },
    )
    train(config_lib.load(None, overrides))
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def test_fp16_run_learns_and_resumes_with_its_scale(tmp_path, digits_root):
    shards = f"{digits_root}/train/{{000000..000005}}.tar"
    whole = run_fp16(tmp_path, "whole", 8, **{"data.train": shards})
    assert whole[-1]["loss"] < 0.8 * whole[0]["loss"]
    assert [r["loss_scale"] for r in whole] == [1024, 1024, 2048, 2048, 4096, 4096, 8192, 8192]
    assert all(r["overflow_steps"] == 0 and r["nonfinite_steps"] == 0 for r in whole)

    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000004"
    resumed = run_fp16(tmp_path, "resumed", 8, **{"data.train": shards, "run.resume": checkpoint})
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for got, want in zip(resumed, whole[4:], strict=True):
        assert got["loss"] == want["loss"] and got["loss_scale"] == want["loss_scale"], got["step"]


def test_deepspeed_config_has_deepspeeds_fp16_section_from_the_keys():
    shape = StepShape(10, 12, 3)
    cfg = settings(initial_scale_power=12, loss_scale_window=500, hysteresis=3, min_loss_scale=4)
    ds = deepspeed_config(cfg.engine, cfg.optim, shape)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,  # dynamic
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "min_loss_scale": 4,
    }
    assert ds["bf16"] == {"enabled": False}
    defaults = deepspeed_config(tiny_config(**{"engine.precision": "fp16"}).engine, cfg.optim, shape)["fp16"]
    assert defaults == {
        **ds["fp16"],
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    for precision in ("fp32", "bf16"):  # as before fp16 existed
        plain = tiny_config(**{"engine.precision": precision, "optim.grad_clip": 1.0})
        assert deepspeed_config(plain.engine, plain.optim, shape) == {
            "train_micro_batch_size_per_gpu": 12,
            "gradient_accumulation_steps": 3,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 2**31,
            "zero_allow_untested_optimizer": True,
        }


def deepspeed_overflow_worker(rank, world, stage, out_dir):
    """DeepSpeed's CPU accelerator declares fp16 unsupported (no oneDNN fp16 kernels on this CPU) and
    deepspeed.initialize refuses it; torch still computes fp16 on the CPU, so the capability check is
    overridden here to run DeepSpeed's real fp16 optimiser and loss scaler."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    assert not get_accelerator().is_fp16_supported()  # the refusal this test steps around
    type(get_accelerator()).is_fp16_supported = lambda self: True
    cfg = settings(hysteresis=1, initial_scale_power=POWER)
    cfg.engine.backend, cfg.engine.zero_stage = "deepspeed", stage
    model = one_layer_model().float()
    engine = DeepSpeedEngine(model, cfg.engine, cfg.optim, StepShape(10, 12, 1), CPU)
    dtypes = {str(p.dtype) for p in engine.model.parameters()} | {str(engine.dtype)}
    loss_fn, inputs, results = build_loss(cfg.loss), inputs32(), {"dtypes": sorted(dtypes), "steps": []}
    param = engine.model.towers["image"].encoder.conv1.weight
    for number in range(4):
        before = engine.model_state()
        handle = overflowing(param) if number == 1 else None
        metrics = train_step(engine, loss_fn, plain_backward, inputs, FP16)
        if handle:
            handle.remove()
        after = engine.model_state()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        results["steps"].append({**metrics, "unchanged": unchanged})
    # A fresh engine (at the initial scale) resumes the scale from DeepSpeed's checkpoint.
    engine.save(out_dir / "checkpoint", {})
    fresh = DeepSpeedEngine(one_layer_model().float(), cfg.engine, cfg.optim, StepShape(10, 12, 1), CPU)
    results["scales"] = [fresh.engine._get_optimizer_loss_scale()]
    fresh.load(out_dir / "checkpoint")
    results["scales"] += [fresh.engine._get_optimizer_loss_scale(), engine.engine._get_optimizer_loss_scale()]
    torch.save(results, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_fp16_skips_an_overflow_halves_its_scale_and_resumes_it(tmp_path, stage):
    launch(deepspeed_overflow_worker, 1, stage, tmp_path)
    results = torch.load(tmp_path / "0.pt")
    assert results["dtypes"] == ["torch.float16"]  # weights, and the inputs cast to them
    steps = results["steps"]
    assert [s["loss_scale"] for s in steps] == [2.0**POWER, 2.0**POWER, 2.0 ** (POWER - 1), 2.0 ** (POWER - 1)]
    assert [s["overflow"] for s in steps] == [0, 1, 0, 0]
    assert [s["unchanged"] for s in steps] == [False, True, False, False]
    assert all(s["nonfinite"] == 0 for s in steps)
    assert results["scales"] == [2.0**POWER, 2.0 ** (POWER - 1), 2.0 ** (POWER - 1)]  # fresh, resumed, saved
