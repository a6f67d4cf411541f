"""The EMA of the weights (optim.ema_decay): equal to a float64 reference of timm's update
ema <- decay * ema + (1 - decay) * weights on the torch engine and under DeepSpeed ZeRO-2/3 on 2 processes
(where each process averages its own partitions), saved and resumed bitwise, written as full weights
(ema.safetensors) and evaluated beside the raw weights; off, it leaves training bitwise unchanged."""

import json
import logging
import shutil

import pytest
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file

from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.convert import to_open_clip_state
from mmcl.cli import main
from mmcl.errors import ConfigError
from mmcl.train.ema import WeightAverage
from mmcl.train.engine import TorchEngine
from mmcl.train.metrics_log import read_records
from mmcl.train.trainer import Trainer

from conftest import tiny_model, tiny_overrides
from launch import launch

STEPS = 10
DECAY = 0.8
START = 2  # through step 2 the average copies the weights


def overrides(digits_root, out, name, **extra):
    return tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": out,
            "run.name": name,
            "run.steps": STEPS,
            "run.checkpoint_every": 5,
            "run.keep_last": 5,
            "optim.warmup_steps": 2,
            "optim.lr": 2e-3,
            "data.batch_size": 8,
            "optim.ema_decay": DECAY,
            "optim.ema_start_step": START,
            **extra,
        },
    )


def as_float64(weights):
    return {name: value.detach().to(torch.float64, copy=True) for name, value in weights.items()}


def reference_ema(history, decay, start):
    """timm's ModelEmaV2 update in float64, one plain loop: history[0] holds the initial weights,
    history[s] the weights after step s."""
    ema = {name: value.clone() for name, value in history[0].items()}
    for step in range(1, len(history)):
        for name in ema:
            weight = history[step][name]
            ema[name] = weight.clone() if step <= start else decay * ema[name] + (1.0 - decay) * weight
    return ema


def train_recording(trainer, checkpoint_at=0):
    """Train to run.steps, recording the weights this process holds before the first step and after
    every step (and checkpointing after step `checkpoint_at`)."""
    held = [as_float64(trainer.engine.held_weights())]
    for batch in trainer.stream:
        trainer.train_step(batch)
        if trainer.state.step == checkpoint_at:
            trainer.checkpoint(force=True)
        held.append(as_float64(trainer.engine.held_weights()))
        if trainer.state.step == STEPS:
            break
    return held


def assert_close_to(got, want):
    assert set(got) >= set(want)
    for name in want:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-7, msg=name)


def assert_apart(a, b, at_least=1e-4):
    """The average is not the weights themselves: a test that equals both proves nothing."""
    gaps = [(a[name].double() - b[name].double()).abs().max().item() for name in b if b[name].numel()]
    assert max(gaps) > at_least  # (a process's partition of a small parameter may be empty)


def test_the_torch_engine_average_equals_the_float64_reference_and_is_what_is_saved_and_evaluated(
    tmp_path, digits_root
):
    extra = {"eval.datasets": f"[{digits_root}]", "eval.linear_probe.mode": "none"}
    trainer = Trainer(config_lib.load(None, overrides(digits_root, tmp_path, "run", **extra)))
    held = train_recording(trainer)
    want = reference_ema(held, DECAY, START)
    assert_close_to(trainer.ema.state(), want)
    assert_apart(trainer.ema.state(), held[-1])

    trainer.checkpoint(force=True)
    checkpoint = checkpoints.latest(trainer.run_dir)
    raw, ema = checkpoints.load_weights(checkpoint), checkpoints.load_weights(checkpoint, ema=True)
    assert_close_to(ema, want)  # the full weights file is the average
    for name, value in raw.items():  # the raw weights are back in place, bit for bit; buffers shared
        if name in held[-1]:
            assert torch.equal(value.double(), held[-1][name]), name
        else:
            assert torch.equal(ema[name], value), name
    assert torch.equal(
        load_file(checkpoint / "ema_0.safetensors")["towers.image.encoder.proj"],
        trainer.ema.state()["towers.image.encoder.proj"],
    )

    results = trainer.evaluate(trainer.run_dir / "eval.json", quiet=True)
    on_raw = json.loads((trainer.run_dir / "eval.json").read_text())
    on_ema = json.loads((trainer.run_dir / "eval_ema.json").read_text())
    name = digits_root.name
    assert results == {name: on_raw[name], f"ema/{name}": on_ema[name]}
    assert on_raw[name] != on_ema[name]
    # The EMA evaluation is the evaluation of ema.safetensors, by `mmcl eval --ema`.
    out = tmp_path / "cli_ema.json"
    assert main(["eval", str(checkpoint), "--ema", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == on_ema


def full_from_partitions(held, shapes, sharded):
    """ZeRO-3's layout, gathered here by hand: process r holds elements [r * n, (r + 1) * n) of each
    flattened parameter (n = its partition's size), the last one padded."""
    if not sharded:
        return held
    full = {}
    for name, part in held.items():
        parts = [torch.empty_like(part) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, part)
        full[name] = torch.cat(parts)[: shapes[name].numel()].view(shapes[name])  # (world * n,) -> shape
    return full


def unpadded(held, shapes, sharded, rank):
    """The elements of each partition that belong to the parameter: the last process's partition ends in
    padding, uninitialised memory that no gather keeps (and that may hold a NaN)."""
    if not sharded:
        return held
    return {
        name: part[: max(0, min(part.numel(), shapes[name].numel() - rank * part.numel()))]
        for name, part in held.items()
    }


def zero_worker(rank, world, cfg_overrides):
    """Under ZeRO each process averages what it holds; the full weights it reports are the average of
    the full weights, and reporting them (in a checkpoint mid-run too) leaves the training weights, and
    so the rest of the run, bitwise as they were."""
    trainer = Trainer(config_lib.load(None, cfg_overrides))
    sharded = trainer.cfg.engine.zero_stage == 3
    shapes = {name: getattr(param, "ds_shape", param.shape) for name, param in trainer.engine.model.named_parameters()}

    def real(weights):
        return unpadded(weights, shapes, sharded, rank)

    held = train_recording(trainer, checkpoint_at=5)
    assert_close_to(real(trainer.ema.state()), reference_ema([real(w) for w in held], DECAY, START))
    saved = load_file(checkpoints.latest(trainer.run_dir) / f"ema_{rank}.safetensors")
    assert_close_to(real(saved), reference_ema([real(w) for w in held[:6]], DECAY, START))
    # Right after a step, as a checkpoint or an evaluation finds them: ZeRO-3's small parameters are
    # gathered then, and must be gathered again from the average's partitions.
    full = trainer.ema.full_weights()
    whole = [full_from_partitions(weights, shapes, sharded) for weights in held]
    assert_close_to(full, reference_ema(whole, DECAY, START))
    assert_apart(full, whole[-1])
    after = real(trainer.engine.held_weights())
    assert all(torch.equal(value.double(), real(held[-1])[name]) for name, value in after.items())
    raw = trainer.engine.model_state()
    assert all(torch.equal(raw[name].double(), whole[-1][name]) for name in whole[-1])
    if sharded:  # the same run without the checkpoint at step 5: the same weights at every step
        plain = Trainer(config_lib.load(None, [*cfg_overrides, "run.name=plain"]))
        again = train_recording(plain)
        assert all(torch.equal(real(a)[k], real(b)[k]) for a, b in zip(held, again, strict=True) for k in a)
        assert_apart(real(held[6]), real(held[5]))  # and the steps after it moved them
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_average_on_two_processes_equals_the_float64_reference(tmp_path, digits_root, stage):
    extra = {"engine.backend": "deepspeed", "engine.zero_stage": stage, "run.checkpoint_every": 1000}
    launch(zero_worker, 2, overrides(digits_root, tmp_path, f"zero{stage}", **extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    """Three runs of the same 10 steps (checkpoints at 5 and 10): with the EMA, resumed from the first
    one's step-5 checkpoint, and without the EMA."""
    out = tmp_path_factory.mktemp("ema_runs")
    Trainer(config_lib.load(None, overrides(digits_root, out, "straight"))).train()
    step5 = out / "straight" / "checkpoints" / "step_00000005"
    Trainer(config_lib.load(None, overrides(digits_root, out, "resumed", **{"run.resume": step5}))).train()
    Trainer(config_lib.load(None, overrides(digits_root, out, "plain", **{"optim.ema_decay": 0.0}))).train()
    return out


def final_checkpoint(run_dir):
    return run_dir / "checkpoints" / f"step_{STEPS:08d}"


def test_a_resumed_run_has_the_uninterrupted_runs_average_bitwise(runs):
    straight, resumed = final_checkpoint(runs / "straight"), final_checkpoint(runs / "resumed")
    for file in ("ema_0.safetensors", "ema.safetensors", "model.safetensors"):
        a, b = load_file(straight / file), load_file(resumed / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    step5 = load_file(runs / "straight" / "checkpoints" / "step_00000005" / "ema_0.safetensors")
    assert_apart(step5, load_file(straight / "ema_0.safetensors"))  # the average moved after the resume


def test_a_checkpoint_without_an_average_resumes_with_the_average_starting_from_its_weights(
    runs, tmp_path, digits_root, caplog
):
    old = tmp_path / "old" / "checkpoints" / "step_00000005"
    shutil.copytree(runs / "straight" / "checkpoints" / "step_00000005", old)
    for file in old.glob("ema*.safetensors"):
        file.unlink()
    with caplog.at_level(logging.WARNING, logger="mmcl.checkpoint"):
        trainer = Trainer(config_lib.load(None, overrides(digits_root, tmp_path, "run", **{"run.resume": old})))
    assert "holds no EMA of the weights" in caplog.text
    weights = trainer.engine.held_weights()
    assert all(torch.equal(trainer.ema.state()[name], weights[name]) for name in weights)
    assert_apart(weights, load_file(runs / "straight" / "checkpoints" / "step_00000005" / "ema_0.safetensors"))


def test_without_the_average_training_is_bitwise_the_same_and_writes_no_ema_files(runs):
    with_ema, without = (
        read_records(runs / "straight" / "metrics.jsonl"),
        read_records(runs / "plain" / "metrics.jsonl"),
    )
    assert [r["loss"] for r in with_ema] == [r["loss"] for r in without] and len(without) == STEPS
    assert [r["grad_norm"] for r in with_ema] == [r["grad_norm"] for r in without]
    a, b = (
        load_file(final_checkpoint(runs / "straight") / "model.safetensors"),
        load_file(final_checkpoint(runs / "plain") / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((runs / "plain").rglob("ema*"))


@pytest.mark.parametrize(
    "setting, key",
    [
        ("optim.ema_decay=1.0", "optim.ema_decay"),
        ("optim.ema_decay=-0.1", "optim.ema_decay"),
        ("optim.ema_start_step=-1", "optim.ema_start_step"),
    ],
)
def test_a_wrong_setting_names_its_key(setting, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_lib.load(None, [setting])


def test_convert_takes_the_average_with_ema_and_says_where_it_has_none(runs, tmp_path, capsys):
    checkpoint = final_checkpoint(runs / "straight")
    assert main(["convert", "open-clip", str(checkpoint), "--ema", "--out", str(tmp_path), "--name", "avg"]) == 0
    exported = load_file(tmp_path / "avg.safetensors")
    ema, raw = (to_open_clip_state(checkpoints.load_weights(checkpoint, ema=e)) for e in (True, False))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert_apart(exported, raw)
    assert main(["convert", "open-clip", str(final_checkpoint(runs / "plain")), "--ema", "--out", str(tmp_path)]) == 2
    assert "holds no ema.safetensors" in capsys.readouterr().err
    assert main(["convert", "zero-fp32", str(checkpoint), "--ema", "--out", str(tmp_path / "x.safetensors")]) == 2


def test_bf16_weights_are_averaged_in_float32_and_written_rounded_to_bf16():
    """bf16 weights (as DeepSpeed holds them in a bf16 run): the average stays float32 (a bf16 average
    would round each 0.1% update away) and follows the float64 reference; its full weights are the
    average rounded to bf16, and the weights are back bit for bit afterwards."""
    cfg = config_lib.load(None, tiny_overrides("unused.tar"))
    engine = TorchEngine(tiny_model().to(torch.bfloat16), cfg.optim, total_steps=STEPS)
    average = WeightAverage(engine, decay=0.999, start_step=0)
    history = [as_float64(engine.held_weights())]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):  # steps of the optimiser, written by hand: each weight moves by up to 5%
        for weight in engine.held_weights().values():
            weight.mul_(1 + 0.05 * torch.rand(weight.shape, generator=g).to(torch.bfloat16))
        average.update(step)
        history.append(as_float64(engine.held_weights()))
    assert_close_to(average.state(), reference_ema(history, 0.999, 0))
    full = average.full_weights()
    for name, value in average.state().items():
        assert full[name].dtype == torch.bfloat16 and torch.equal(full[name], value.to(torch.bfloat16)), name
    assert all(torch.equal(engine.held_weights()[k].double(), history[-1][k]) for k in history[-1])
