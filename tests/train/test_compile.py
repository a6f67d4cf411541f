"""engine.compile: the towers compiled in place give eager's loss and gradients, and leave parameter
names, checkpoints and the open_clip conversion as they are."""

import open_clip
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from mmcl import config as config_lib
from mmcl.checkpoint.convert import export_open_clip
from mmcl.config import LossConfig
from mmcl.losses import build_loss
from mmcl.models import MultiEncoder
from mmcl.train.compile import compile_towers
from mmcl.train.engine import TORCH_STATE_FILE
from mmcl.train.gradcache import plain_backward
from mmcl.train.trainer import train

from conftest import tiny_overrides
from test_gradcache import NO_AUTOCAST, batch, engine_for, grads, one_layer_model

SMALL = {
    "model.embed_dim": 16,
    "model.towers.image.options": "{layers: 1, width: 32, head_width: 16}",
    "model.towers.text.options": "{layers: 1, width: 32, heads: 2}",
}


def test_compiled_towers_give_eager_loss_and_gradients():
    """In float64, so that the only difference left is the order in which inductor's fused kernels add
    and multiply: rounding at ~1e-16 relative, which 1e-9 bounds with room for the model's depth, while
    any real difference (a dropped term, a wrong op) would be of the gradients' own size."""
    loss_fn = build_loss(LossConfig())
    eager, compiled = one_layer_model(), one_layer_model()  # the same seed: the same weights
    compile_towers(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: no `_orig_mod.` prefix
    counters.clear()
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        loss = plain_backward(engine_for(model), loss_fn, batch(), NO_AUTOCAST)["loss"]
        results[name] = loss, grads(model)
    assert counters["stats"]["unique_graphs"] >= 2  # both towers really ran through compiled graphs
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results["eager"], results["compiled"]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-9, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_compiled_run_keeps_checkpoint_keys_and_conversion(tmp_path, digits_root):
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": tmp_path,
            "run.name": "compiled",
            "run.steps": 2,
            "data.batch_size": 16,
            "engine.compile": "true",
            **SMALL,
        },
    )
    cfg = config_lib.load(None, overrides)
    counters.clear()
    run_dir = train(cfg).run_dir
    assert counters["stats"]["unique_graphs"] >= 2
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    expected = set(MultiEncoder(cfg.model).state_dict())
    weights = load_file(checkpoint / "model.safetensors")
    assert set(weights) == expected
    assert set(torch.load(checkpoint / TORCH_STATE_FILE, weights_only=True)["model"]) == expected

    # The open_clip export loads into open_clip's own model, every key matched, every value equal.
    config_path, weights_path = export_open_clip(weights, cfg, tmp_path / "open_clip", "compiled-test")
    open_clip.add_model_config(config_path)
    reference = open_clip.create_model("compiled-test", pretrained=str(weights_path))
    exported = load_file(weights_path)
    assert set(reference.state_dict()) == set(exported)
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in exported.items())
