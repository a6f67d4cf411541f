"""Parameter groups: per-tower learning rates and weight decay, layer-wise decay (against a table worked out
from BEiT's rule as the MAE code writes it), the groups kept over a checkpoint and resume, partial
unlocking and unlocking after a step (bitwise, under DeepSpeed ZeRO-2 on 2 processes with the gradient
cache), and the config checks."""

import logging

import pytest
import torch
import torch.distributed as torch_dist

from mmcl.checkpoint import state as checkpoints
from mmcl.errors import ConfigError
from mmcl.losses import build_loss
from mmcl.models import MultiEncoder, check_model_config
from mmcl.train.engine import StepShape, build_engine
from mmcl.train.gradcache import build_backward, micro_steps
from mmcl.train.optim import lr_factor

from conftest import tiny_config
from launch import launch
from test_gradcache import NO_AUTOCAST

BATCH = 8  # per process
VOCAB = 1000  # a small text vocabulary keeps the weight snapshots small
# Three blocks per tower: unlocking the last one is then distinguishable from the first and the middle.
SMALL = {
    "model.embed_dim": 16,
    "model.towers.image.options": "{layers: 3, width: 32, head_width: 16}",
    "model.towers.text.options": f"{{layers: 3, width: 32, heads: 2, vocab_size: {VOCAB}}}",
    "optim.lr": 1e-3,
    "optim.weight_decay": 0.1,
    "optim.warmup_steps": 3,
    "run.steps": 40,  # the schedule's length: 20 steps end mid-cosine
}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads mostly
    wait on each other (one step: 0.02 s on one thread, 1.9 s on two at a load of 7 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**extra):
    return tiny_config(**{**SMALL, **extra})


def build(cfg, seed=0):
    """The model and engine of `cfg` (seeded weights), stepping with the configured backward."""
    torch.manual_seed(seed)
    model = MultiEncoder(cfg.model)
    backward = build_backward(cfg.engine.grad_cache)
    shape = StepShape(cfg.run.steps, BATCH, micro_steps(backward, model.modalities, BATCH))
    return build_engine(model, cfg.engine, cfg.optim, shape, torch.device("cpu")), backward


def train_steps(engine, backward, cfg, steps, first_step=0, rank=0, after_step=None):
    loss_fn = build_loss(cfg.loss)
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each process its own samples
        inputs = {
            "image": torch.randn(BATCH, 3, 32, 32, generator=g),
            "text": torch.randint(1, VOCAB, (BATCH, 16), generator=g),
        }
        backward(engine, loss_fn, inputs, NO_AUTOCAST)
        engine.step()
        if after_step is not None:
            after_step(step + 1)


def optimizer_groups(engine):
    """The torch optimiser's groups (under DeepSpeed, the client optimiser ZeRO wraps)."""
    optimizer = engine.optimizer if hasattr(engine, "optimizer") else engine.engine.optimizer
    return optimizer.param_groups


def group_settings(engine):
    keys = ("name", "lr", "initial_lr", "weight_decay", "frozen_steps")
    return [{key: group[key] for key in keys} for group in optimizer_groups(engine)]


# (a) The groups after build, against a slow table from the published rule ------------------------------


def mae_layer_id(name, num_blocks, embedding, head):
    """MAE's get_layer_id_for_vit (facebookresearch/mae util/lr_decay.py, after BEiT), for open_clip's
    names: the embeddings 0, block i at i + 1, anything else num_layers = L + 1."""
    parts = name.split(".")
    if parts[0] in embedding:
        return 0
    if parts[:2] == ["transformer", "resblocks"]:
        return int(parts[2]) + 1
    assert parts[0] in head, name
    return num_blocks + 1


def expected_table(model, tower_settings, optim):
    """parameter name -> (lr, weight decay), worked out parameter by parameter from MAE's param_groups_lrd:
    num_layers = L + 1, layer_scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]."""
    embedding = {
        "image": {"conv1", "class_embedding", "positional_embedding", "ln_pre"},
        "text": {"token_embedding", "positional_embedding"},
    }
    head = {"image": {"ln_post", "proj"}, "text": {"ln_final", "text_projection"}}
    table = {"similarity.logit_scale": (optim.lr, 0.0)}
    for modality, (lr, weight_decay, decay) in tower_settings.items():
        num_layers = 3 + 1
        layer_scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]
        for name, param in model.tower(modality).encoder.named_parameters():
            layer_id = mae_layer_id(name, 3, embedding[modality], head[modality])
            no_decay = param.ndim == 1  # MAE: "no decay: all 1D parameters"
            table[f"towers.{modality}.encoder.{name}"] = (
                lr * layer_scales[layer_id],
                0.0 if no_decay else weight_decay,
            )
    return table


def test_groups_hold_the_configured_rates_and_decays():
    cfg = small_config(
        **{
            "model.towers.image.lr": 2e-3,
            "model.towers.image.weight_decay": 0.05,
            "model.towers.image.layer_decay": 0.6,
            "model.towers.text.layer_decay": 0.8,
        }
    )
    engine, _ = build(cfg)
    table = expected_table(engine.model, {"image": (2e-3, 0.05, 0.6), "text": (1e-3, 0.1, 0.8)}, cfg.optim)
    group_of = {id(p): group for group in optimizer_groups(engine) for p in group["params"]}
    assert len(group_of) == sum(len(group["params"]) for group in optimizer_groups(engine))  # each param once
    assert set(table) == {name for name, _ in engine.model.named_parameters()}
    for name, param in engine.model.named_parameters():
        group = group_of[id(param)]
        lr, weight_decay = table[name]
        assert group["initial_lr"] == pytest.approx(lr, rel=1e-12), (name, group["name"])
        assert group["weight_decay"] == weight_decay, (name, group["name"])
    assert optimizer_groups(engine)[0]["name"] == "similarity/no_decay"  # the rate the log reports
    names = [group["name"] for group in optimizer_groups(engine)]
    assert "image/block2/decay" in names and "text/embed/decay" in names and "image/head/no_decay" in names
    for step in range(6):  # every group follows the schedule at its own rate
        for group in optimizer_groups(engine):
            assert group["lr"] == pytest.approx(group["initial_lr"] * lr_factor(step, cfg.optim, 40), rel=1e-12)
        engine.optimizer.step()  # no gradients: moves nothing
        engine.scheduler.step()


def test_without_layer_decay_one_rate_per_tower():
    cfg = small_config(**{"model.towers.text.lr": 3e-4})
    engine, _ = build(cfg)
    settings = {g["name"]: (g["initial_lr"], g["weight_decay"]) for g in optimizer_groups(engine)}
    assert settings == {
        "similarity/no_decay": (1e-3, 0.0),
        "image/decay": (1e-3, 0.1),
        "image/no_decay": (1e-3, 0.0),
        "text/decay": (3e-4, 0.1),
        "text/no_decay": (3e-4, 0.0),
    }


def test_the_table_is_logged_once_on_process_0(caplog):
    with caplog.at_level(logging.INFO, logger="mmcl.train"):
        build(small_config(**{"model.towers.image.layer_decay": 0.5}))
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("parameter groups")]
    assert len(tables) == 1
    lines = tables[0].splitlines()
    assert lines[1].split() == ["group", "parameters", "peak", "lr", "weight", "decay", "frozen", "steps"]
    block2 = next(line.split() for line in lines if line.startswith("image/block2/decay "))
    assert float(block2[2]) == pytest.approx(1e-3 * 0.5) and block2[3] == "0.1"  # the last block: decay ** 1


# (b) After a resume ------------------------------------------------------------------------------------


def test_groups_survive_a_checkpoint_and_resume(tmp_path):
    cfg = small_config(
        **{
            "model.towers.image.layer_decay": 0.7,
            "model.towers.text.locked": True,
            "model.towers.text.unlocked_blocks": 1,
            "model.towers.text.unlock_after_step": 5,
        }
    )
    engine, backward = build(cfg)
    train_steps(engine, backward, cfg, 4)
    path = checkpoints.save(tmp_path, 4, engine, {}, "", keep_last=1)
    resumed, _ = build(cfg, seed=1)
    checkpoints.load(path, resumed)
    assert group_settings(resumed) == group_settings(engine)
    for run in (engine, resumed):
        train_steps(run, backward, cfg, 3, first_step=4)
    assert group_settings(resumed) == group_settings(engine)
    text_later = [g for g in optimizer_groups(engine) if g["frozen_steps"] == 5]
    assert text_later and all(g["lr"] > 0 for g in text_later)  # unlocked after step 5


# AdamW at rate 0 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_adamw_at_rate_zero_leaves_weights_bitwise_unchanged(implementation):
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 64, generator=g))
    before = param.detach().clone()
    # weight_decay > 0: the decoupled decay p *= 1 - lr * wd must be a multiplication by exactly 1.
    optimizer = torch.optim.AdamW([param], lr=0.0, weight_decay=0.2, **implementation)
    for _ in range(5):
        param.grad = torch.randn(64, 64, generator=g)
        optimizer.step()
    assert torch.equal(param.detach().view(torch.int32), before.view(torch.int32))


# Partial unlocking: which parameters train -----------------------------------------------------------


@pytest.mark.parametrize("norms", [False, True])
def test_partial_unlocking_leaves_the_last_block_and_head_trainable(norms):
    cfg = small_config(
        **{
            "model.towers.image.locked": True,
            "model.towers.image.unlocked_blocks": 1,
            "model.towers.image.unlocked_norms": norms,
        }
    )
    model = MultiEncoder(cfg.model)
    trainable = {name for name, p in model.tower("image").encoder.named_parameters() if p.requires_grad}
    expected = {
        name
        for name, _ in model.tower("image").encoder.named_parameters()
        if name.startswith(("transformer.resblocks.2.", "ln_post.", "proj"))
        or (norms and any(part.startswith("ln_") for part in name.split(".")[:-1]))
    }
    assert trainable == expected
    assert ("transformer.resblocks.0.ln_1.weight" in trainable) == norms
    assert all(p.requires_grad for p in model.tower("text").parameters())


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_every_parameter_of_a_tower_has_a_depth(modality):
    cfg = tiny_config(
        **{
            "model.towers.audio.type": "audio_spectrogram",
            "model.towers.audio.preset": "mmcl-tiny",
            "model.towers.audio.options": "{layers: 3}",
        }
    )
    tower = MultiEncoder(cfg.model).tower(modality)
    depths = {name: tower.depth_of(name) for name, _ in tower.named_parameters()}
    assert set(depths.values()) == set(range(tower.num_blocks + 2))
    blocks = {name: d for name, d in depths.items() if ".resblocks." in name}
    assert all(d == int(name.split("resblocks.")[1].split(".")[0]) + 1 for name, d in blocks.items())


# The config checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, key",
    [
        (
            {"model.towers.image.locked": True, "model.towers.image.unlocked_blocks": 4},
            "model.towers.image.unlocked_blocks",
        ),
        ({"model.towers.text.unlock_after_step": 5}, "model.towers.text.unlock_after_step"),
        ({"model.towers.text.unlocked_blocks": 1}, "model.towers.text.unlocked_blocks"),
        ({"model.towers.text.unlocked_norms": True}, "model.towers.text.unlocked_norms"),
        ({"model.towers.image.layer_decay": 0.0}, "model.towers.image.layer_decay"),
        ({"model.towers.image.layer_decay": 1.5}, "model.towers.image.layer_decay"),
        ({"model.towers.image.lr": 0.0}, "model.towers.image.lr"),
        ({"model.towers.image.weight_decay": -0.1}, "model.towers.image.weight_decay"),
        (
            {
                "model.towers.image.preset": "RN50",
                "model.towers.image.options": "{}",
                "model.towers.image.layer_decay": 0.8,
            },
            "model.towers.image.layer_decay",
        ),
    ],
)
def test_a_bad_setting_names_its_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_model_config(small_config(**settings).model)


def test_a_negative_count_names_its_key_at_load():
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.unlocked_blocks"):
        small_config(**{"model.towers.image.locked": True, "model.towers.image.unlocked_blocks": -1})


# (c) and (d) under DeepSpeed ZeRO-2, 2 processes, gradient cache ------------------------------------------

ZERO2 = {
    "engine.backend": "deepspeed",
    "engine.zero_stage": 2,
    "engine.grad_cache.image": 4,
    "engine.grad_cache.text": 4,
    "optim.grad_clip": 1.0,
}
PARTIAL = {
    **ZERO2,
    "model.towers.image.locked": True,
    "model.towers.image.unlocked_blocks": 1,
    "model.towers.image.lr": 2e-3,
    "model.towers.text.locked": True,
    "model.towers.text.unlocked_blocks": 1,
    "model.towers.text.unlocked_norms": True,
    "model.towers.text.layer_decay": 0.7,
}
LATER = {**ZERO2, "model.towers.text.locked": True, "model.towers.text.unlock_after_step": 5}
STEPS = 20
LATER_STEPS = 8


def zero2_worker(rank, world, out_dir):
    results = {}
    cfg = small_config(**PARTIAL)
    engine, backward = build(cfg)
    results["partial"] = [engine.model_state()]
    train_steps(engine, backward, cfg, STEPS, rank=rank)
    results["partial"].append(engine.model_state())
    path = checkpoints.save(out_dir / "run", STEPS, engine, {}, "", keep_last=1)
    resumed, _ = build(cfg, seed=1)
    checkpoints.load(path, resumed)
    results["groups"] = (group_settings(engine), group_settings(resumed))

    cfg = small_config(**LATER)
    engine, backward = build(cfg)
    snapshots = [engine.model_state()]
    train_steps(
        engine,
        backward,
        cfg,
        LATER_STEPS,
        rank=rank,
        after_step=lambda _: snapshots.append(engine.model_state()),
    )
    results["later"] = snapshots
    if rank == 0:
        torch.save(results, out_dir / "results.pt")
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("param_groups")
    launch(zero2_worker, 2, out)
    return torch.load(out / "results.pt")


def changed(before, after, names):
    return {name for name in names if not torch.equal(before[name], after[name])}


def test_partial_unlocking_trains_only_the_last_block_under_zero2(zero2_results):
    first, last = zero2_results["partial"]
    image = {n for n in first if n.startswith("towers.image.")}
    text = {n for n in first if n.startswith("towers.text.")}
    # By hand: the last of 3 blocks and the head above it; for text also every norm layer.
    image_trained = {
        n
        for n in image
        if n.startswith(
            (
                "towers.image.encoder.transformer.resblocks.2.",
                "towers.image.encoder.ln_post.",
                "towers.image.encoder.proj",
            )
        )
    }
    text_trained = {
        n
        for n in text
        if n.startswith(
            (
                "towers.text.encoder.transformer.resblocks.2.",
                "towers.text.encoder.ln_final.",
                "towers.text.encoder.text_projection",
            )
        )
        or n.split(".")[-2] in ("ln_1", "ln_2")
    }
    assert changed(first, last, image) == image_trained
    assert changed(first, last, text) == text_trained
    assert "similarity.logit_scale" in changed(first, last, first)


def test_groups_survive_a_zero2_checkpoint_and_resume(zero2_results):
    saved, resumed = zero2_results["groups"]
    assert resumed == saved
    by_name = {g["name"]: g for g in saved}
    assert by_name["image/decay"]["initial_lr"] == 2e-3
    assert by_name["text/block2/decay"]["initial_lr"] == pytest.approx(1e-3 * 0.7)
    assert by_name["text/block0/no_decay"]["initial_lr"] == pytest.approx(1e-3 * 0.7**3)  # its norms
    for group in saved:  # 20 steps into a 40-step schedule: each at its own rate times the same factor
        assert group["lr"] == pytest.approx(group["initial_lr"] * lr_factor(STEPS, small_config().optim, 40))
    assert by_name["similarity/no_decay"]["lr"] > 0


def test_unlock_after_step_keeps_the_tower_bitwise_until_then_under_zero2(zero2_results):
    snapshots = zero2_results["later"]
    text = [n for n in snapshots[0] if n.startswith("towers.text.")]
    image = [n for n in snapshots[0] if n.startswith("towers.image.")]
    assert changed(snapshots[0], snapshots[1], image)  # the other tower trains from step 1
    for step in range(1, 6):  # through warm-up (steps 1-3) and into the cosine (4-5): unchanged
        assert not changed(snapshots[0], snapshots[step], text), step
    assert changed(snapshots[5], snapshots[6], text) == set(text)  # step 6 moves every text weight
    assert changed(snapshots[6], snapshots[LATER_STEPS], text) == set(text)


def test_adamw_runs_torchs_fused_kernel_with_its_loops_update_rule():
    """optim.fused (the default) builds torch's fused AdamW; its updates over the parameter groups equal
    those of torch's per-parameter loop (optim.fused=false) to float32 rounding, decay and no-decay alike."""
    from mmcl.train.optim import build_optimizer

    torch.manual_seed(0)
    models, optimizers = [], []
    for fused in (True, False):
        cfg = tiny_config(**{**SMALL, "optim.fused": fused})
        model = MultiEncoder(cfg.model)
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
        optimizers.append(build_optimizer(model, cfg.optim))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    start = {name: p.detach().clone() for name, p in models[1].named_parameters()}
    for step in range(3):
        grads = {
            name: torch.randn_like(p, generator=torch.Generator().manual_seed(step))
            for name, p in models[0].named_parameters()
        }
        for model, optimizer in zip(models, optimizers, strict=True):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            optimizer.step()
    fused, loop = dict(models[0].named_parameters()), dict(models[1].named_parameters())
    for name, p in loop.items():
        assert not torch.equal(p, start[name]), name  # every weight took the three updates
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-7, msg=name)


def test_a_resumed_optimizer_runs_as_its_config_says_under_fp16s_loss_scale():
    """A checkpoint of the loop (an older run, or optim.fused=false) resumed with the fused default steps
    fused, through fp16's loss scale, overflow included; and the other way round."""
    from mmcl.train.optim import build_optimizer

    def optimizer(fused, model=None):
        cfg = tiny_config(**{**SMALL, "optim.fused": fused})
        model = model or MultiEncoder(cfg.model)
        return model, build_optimizer(model, cfg.optim)

    def scaled_step(model, opt, scaler, value):
        scaler.scale(torch.ones(()))  # the scale is made on first use
        for p in model.parameters():
            p.grad = torch.full_like(p, value) * scaler.get_scale()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    loop_model, loop = optimizer(False)
    scaled_step(loop_model, loop, torch.amp.GradScaler("cpu"), 1e-3)
    model, fused = optimizer(True, loop_model)
    fused.load_state_dict(loop.state_dict())
    assert all(group["fused"] for group in fused.param_groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu")
    scaled_step(model, fused, scaler, float("inf"))  # an overflow: skipped, the scale lowered
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    scaled_step(model, fused, scaler, 1e-3)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    _, back = optimizer(False, model)
    back.load_state_dict(fused.state_dict())
    assert not any(group["fused"] for group in back.param_groups)
