"""Distillation in training: the teacher is checked before any compute (naming loss.distill_from), stays
frozen and outside the engine, and the gradient cache (also under ZeRO-3 on 2 processes) gives the
gradients of plain backward with the distillation term on."""

import json
from functools import partial

import open_clip
import pytest
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file

from mmcl import config as config_lib
from mmcl.checkpoint.hf_clip import export_hf_clip
from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses import build_loss
from mmcl.losses.distill import DistillationLoss, with_distillation
from mmcl.train.engine import DeepSpeedEngine, StepShape
from mmcl.train.gradcache import GradCache, plain_backward
from mmcl.train.teacher import Teacher, build_teacher, check_teacher
from mmcl.train.trainer import Trainer, check_config

from conftest import tiny_config, tiny_model, tiny_overrides
from launch import launch
from test_gradcache import BATCH, NO_AUTOCAST, assert_same_grads, batch, engine_for, grads, one_layer_model


def save_teacher(directory, seed=7, **settings):
    """An mmcl checkpoint directory (config.yaml + model.safetensors) of a tiny model with `settings`."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**settings)
    (directory / "config.yaml").write_text(config_lib.to_yaml(cfg))
    save_file(tiny_model(seed, **settings).state_dict(), directory / "model.safetensors")
    return directory


def test_grad_cache_equals_plain_backward_with_distillation():
    # A teacher of another size (width 128, 64-dimensional embeddings) than the student (width 32, 16).
    teacher = Teacher(tiny_model(7), ["image", "text"], "fp32", torch.device("cpu")).embed(batch())
    loss_fn = partial(DistillationLoss(build_loss(LossConfig()), weight=2.0), teacher=teacher)
    model = one_layer_model()
    plain = plain_backward(engine_for(model), loss_fn, batch(), NO_AUTOCAST)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cached = GradCache({"image": 5, "text": 4})(engine_for(model), loss_fn, batch(), NO_AUTOCAST)
    for part in ("loss", "contrastive", "distill"):
        torch.testing.assert_close(cached[part], plain[part], rtol=1e-12, atol=0)
    assert plain["distill"] > 0.1
    assert_same_grads(grads(model), expected)
    # The term moves the gradients: without it they differ (so the comparison covers it).
    model.zero_grad(set_to_none=True)
    plain_backward(engine_for(model), build_loss(LossConfig()), batch(), NO_AUTOCAST)
    assert not torch.allclose(grads(model)["towers.image.encoder.proj"], expected["towers.image.encoder.proj"])


def test_the_teacher_runs_in_the_run_s_precision_and_hands_the_loss_float32():
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(2, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (2, 16), generator=g)}
    fp32 = Teacher(tiny_model(7), ["image", "text"], "fp32", torch.device("cpu"))
    bf16 = Teacher(tiny_model(7), ["image", "text"], "bf16", torch.device("cpu"))
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in bf16.model.parameters()} == {"cpu"}
    low, full = bf16.embed(inputs), fp32.embed(inputs)
    for m in ("image", "text"):
        assert low.embeddings[m].dtype == torch.float32 and not low.embeddings[m].requires_grad
        torch.testing.assert_close(low.embeddings[m], full.embeddings[m], rtol=0, atol=0.05)  # bf16: ~2 digits
    assert low.logit_scale.dtype == torch.float32


def distilled_config(tmp_path, teacher_path, train="unused.tar", **extra):
    return config_lib.load(
        None,
        tiny_overrides(
            train,
            **{"run.output_dir": tmp_path, "loss.distill_from": teacher_path, "loss.distill_weight": 0.5, **extra},
        ),
    )


@pytest.mark.parametrize(
    "teacher_settings, student_settings, message",
    [
        ({"model.towers.image.options": "{image_size: 64}"}, {}, "image tower takes other inputs"),
        ({"model.towers.text.options": "{context_length: 32}"}, {}, "text tower takes other inputs"),
        (
            {},
            {"model.towers.audio.type": "audio_spectrogram", "model.towers.audio.preset": "mmcl-tiny"},
            "no audio tower",
        ),
        ({}, {"data.optional_modalities": "[image]"}, "lacking a modality"),
    ],
)
def test_a_mismatched_teacher_fails_before_compute_naming_the_key(
    tmp_path, digits_root, teacher_settings, student_settings, message
):
    teacher = save_teacher(tmp_path / "teacher", **teacher_settings)
    cfg = distilled_config(tmp_path, teacher, f"{digits_root}/train/000000.tar", **student_settings)
    with pytest.raises(ConfigError, match=f"'loss.distill_from'.*{message}"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="'loss.distill_from'"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # nothing built or written


@pytest.mark.parametrize("path", ["no/such/run", "mmcl-tiny=no/such/file.pt", "no-such-arch={file}"])
def test_a_missing_teacher_fails_naming_the_key(tmp_path, digits_root, path):
    (tmp_path / "weights.pt").write_bytes(b"")
    cfg = distilled_config(tmp_path, path.format(file=tmp_path / "weights.pt"), f"{digits_root}/train/000000.tar")
    with pytest.raises(ConfigError, match="'loss.distill_from'"):
        check_config(cfg)


def test_teachers_in_every_format_mmcl_eval_reads_are_checked_and_loaded(tmp_path):
    student = tiny_config()
    # CLIPModel pools the class token: the mmcl teacher that is exported to one does too.
    run = save_teacher(tmp_path / "mmcl", **{"model.towers.image.options": "{pool_type: tok}"})
    open_clip_file = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("mmcl-tiny").state_dict(), open_clip_file)
    hf_dir = export_hf_clip(
        load_file(run / "model.safetensors"), config_lib.from_yaml((run / "config.yaml").read_text()), tmp_path / "hf"
    )
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(3, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (3, 16), generator=g)}
    embedded = {}
    for name, path in (("mmcl", run), ("open_clip", f"mmcl-tiny={open_clip_file}"), ("hf", hf_dir)):
        loss = distilled_config(tmp_path, path).loss
        check_teacher(loss, student.model, [])
        teacher = build_teacher(loss, student.model, "fp32", torch.device("cpu"))
        embedded[name] = teacher.embed(inputs)
        assert embedded[name].embeddings["image"].shape == (3, 128 if name == "open_clip" else 64)
    # The CLIPModel export of the mmcl teacher is the same model: the same embeddings.
    for m in ("image", "text"):
        torch.testing.assert_close(embedded["hf"].embeddings[m], embedded["mmcl"].embeddings[m], rtol=1e-4, atol=1e-5)


def test_the_teacher_is_frozen_outside_the_engine_and_off_by_default(tmp_path, digits_root):
    teacher_dir = save_teacher(tmp_path / "teacher")
    saved = load_file(teacher_dir / "model.safetensors")
    cfg = distilled_config(
        tmp_path,
        teacher_dir,
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "data.batch_size": 16,
            "run.steps": 3,
            "run.checkpoint_every": 3,
        },
    )
    trainer = Trainer(cfg)
    teacher = trainer.teacher.model
    result = trainer.train()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name  # unchanged by three optimiser steps
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in trainer.engine.model.parameters()}
    assert not teacher_ids & {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    checkpoint = torch.load(result.run_dir / "checkpoints/step_00000003/engine.pt", weights_only=True)
    assert checkpoint["model"].keys() == trainer.engine.model.state_dict().keys()  # the student's alone
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["distill"] > 0
        assert record["loss"] == pytest.approx(record["contrastive"] + 0.5 * record["distill"], rel=1e-6)

    # Off (the default): the built loss itself, unwrapped, and no teacher.
    off = LossConfig()
    loss = build_loss(off)
    assert with_distillation(loss, off) is loss
    assert build_teacher(off, cfg.model, "fp32", torch.device("cpu")) is None


def zero3_worker(rank, world, out_dir):
    """One SGD(lr=1) step under ZeRO-3 with distillation: the weight change is minus the averaged gradient,
    through the gradient cache and through one full graph."""
    cfg = config_lib.load(None, tiny_overrides("unused.tar", **{"engine.backend": "deepspeed", "engine.zero_stage": 3}))
    g = torch.Generator().manual_seed(10 + rank)
    inputs = {"image": torch.randn(12, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (12, 16), generator=g)}
    teacher = Teacher(tiny_model(7), ["image", "text"], "fp32", torch.device("cpu")).embed(inputs)
    loss_fn = partial(DistillationLoss(build_loss(cfg.loss), weight=2.0), teacher=teacher)
    chunks = {"image": 5, "text": 3}
    results = {}
    for mode in ("full_graph", "grad_cache"):
        model = one_layer_model().float()
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
        if mode == "grad_cache":
            cache(engine, loss_fn, inputs, NO_AUTOCAST)
        else:
            plain_backward(engine, loss_fn, inputs, NO_AUTOCAST)
        after = engine.model_state()
        results[mode] = {k: before[k] - after[k] for k in before}
    torch.save(results, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


def test_grad_cache_equals_plain_under_zero3_on_two_processes(tmp_path):
    launch(zero3_worker, 2, tmp_path)
    for rank in range(2):
        results = torch.load(tmp_path / f"{rank}.pt")
        full, cached = results["full_graph"], results["grad_cache"]
        assert any(v.abs().sum() > 0 for v in full.values())
        for name in full:
            torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


assert BATCH == 12  # batch() of test_gradcache, which the teacher embeds above
