"""Two image views per sample as positives of each other (loss.view_weight) through a step: exact through
the gradient cache and under DeepSpeed ZeRO-2 on 2 processes; settings nothing can use fail naming the key.
The term itself is checked against SupCon's and SimCLR's references in tests/losses/test_view_term.py."""

import pytest
import torch
import torch.distributed as torch_dist

from mmcl import config as config_lib
from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses import build_loss
from mmcl.train.engine import DeepSpeedEngine, StepShape
from mmcl.train.gradcache import GradCache, micro_steps, plain_backward
from mmcl.train.trainer import check_config
from mmcl.train.views import Views

from conftest import tiny_overrides
from launch import assert_ranks_equal_one_process, launch
from test_gradcache import NO_AUTOCAST, assert_same_grads, engine_for, grads, one_layer_model

BATCH = 6


def view_loss(**settings):
    return build_loss(LossConfig(name="multi_positive", **{"view_weight": 0.7, "view_temperature": 0.2, **settings}))


def image_views_batch(batch=BATCH, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return {
        "image": torch.randn(batch, 2, 3, 32, 32, generator=g, dtype=dtype),  # two views of each image
        "text": torch.randint(1, 49000, (batch, 16), generator=g),
    }


def test_gradient_cache_equals_plain_backward_with_the_view_term():
    model = one_layer_model()
    flat, step_loss = Views({"image": 2}).attach(image_views_batch(), view_loss())
    plain = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cached = GradCache({"image": 5, "text": 4})(
        engine_for(model), step_loss, flat, NO_AUTOCAST
    )  # chunks split samples' views
    torch.testing.assert_close(cached["image-image"], plain["image-image"], rtol=1e-12, atol=0)
    torch.testing.assert_close(cached["loss"], plain["loss"], rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    without = plain_backward(
        engine_for(one_layer_model()),
        Views({"image": 2}).attach(image_views_batch(), view_loss(view_weight=0.0))[1],
        flat,
        NO_AUTOCAST,
    )
    assert abs(float(without["loss"]) - float(plain["loss"])) > 1e-3  # the term is in the step's loss


def zero2_worker(rank, world, out_dir):
    """One SGD(lr=1) step of this process's half of the batch (two image views each, the view term on), the
    gradient cache on, under ZeRO-2: each weight's change is minus the averaged gradient."""
    settings = {
        "engine.backend": "deepspeed",
        "engine.zero_stage": 2,
        "optim.grad_clip": 0.0,
        "optim.warmup_steps": 0,
        "optim.schedule": "constant",
    }
    cfg = config_lib.load(None, tiny_overrides("unused.tar", **settings))
    half = BATCH // world
    inputs = {m: x[rank * half : (rank + 1) * half] for m, x in image_views_batch(dtype=torch.float32).items()}
    views = Views({"image": 2})
    flat, step_loss = views.attach(inputs, view_loss())
    cache = GradCache({"image": 3, "text": 2})
    model = one_layer_model().float()
    steps = micro_steps(cache, ["image", "text"], half, views.extra_rows(half))
    shape = StepShape(1, half, steps)
    engine = DeepSpeedEngine(
        model, cfg.engine, cfg.optim, shape, torch.device("cpu"), optimizer=torch.optim.SGD(model.parameters(), lr=1.0)
    )
    before = engine.model_state()
    loss = cache(engine, step_loss, flat, NO_AUTOCAST)["loss"]
    engine.step()
    after = engine.model_state()
    torch.save({"loss": loss, "grads": {k: before[k] - after[k] for k in before}}, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_processes_with_image_views_under_zero2_equal_one_process(tmp_path):
    launch(zero2_worker, 2, tmp_path)
    model = one_layer_model().float()
    flat, step_loss = Views({"image": 2}).attach(image_views_batch(dtype=torch.float32), view_loss())
    loss = plain_backward(engine_for(model), step_loss, flat, NO_AUTOCAST)["loss"]
    expected = grads(model)
    assert_ranks_equal_one_process(tmp_path, loss, expected)


def test_a_view_weight_nothing_can_use_fails_naming_the_key(tmp_path):
    (tmp_path / "0.tar").touch()

    def config(**extra):
        return config_lib.load(None, tiny_overrides(str(tmp_path / "0.tar"), **extra))

    with pytest.raises(ConfigError, match="'loss.view_weight'.*'infonce'.*multi_positive"):
        check_config(config(**{"loss.view_weight": 1.0}))
    with pytest.raises(ConfigError, match="'loss.view_weight': no modality has several rows"):
        check_config(config(**{"loss.view_weight": 1.0, "loss.name": "multi_positive"}))
    one_caption = {"loss.view_weight": 1.0, "loss.name": "multi_positive", "data.captions": "all"}
    with pytest.raises(ConfigError, match="'loss.view_weight': no modality has several rows"):
        check_config(config(**one_caption))  # K = 1 caption: nothing to contrast
    check_config(config(**one_caption, **{"data.captions_per_sample": 2}))
    with pytest.raises(ConfigError, match="'loss.view_weight': must be at least 0"):
        config(**{"loss.view_weight": -1.0})
    with pytest.raises(ConfigError, match="'loss.view_temperature'"):
        config(**{"loss.view_temperature": 0.0})
    check_config(config(**{"loss.view_weight": 1.0, "loss.name": "multi_positive", "data.views": "{image: 2}"}))
