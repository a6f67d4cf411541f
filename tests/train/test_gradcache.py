"""The gradient cache gives the full-batch gradients, with random masking on (its RNG is replayed)."""

import json

import pytest
import torch

from mmcl import config as config_lib
from mmcl.config import LossConfig
from mmcl.losses import build_loss
from mmcl.train.engine import TorchEngine
from mmcl.train.gradcache import GradCache, plain_backward
from mmcl.train.trainer import train

from conftest import tiny_config, tiny_model, tiny_overrides

NO_AUTOCAST = torch.autocast("cpu", enabled=False)
BATCH = 12


def one_layer_model(patch_dropout=0.0, bias=None):
    """A one-layer, width-32 image-text model in float64, optionally with patch dropout and a logit bias."""
    return tiny_model(
        **{
            "model.embed_dim": 16,
            "model.init_logit_bias": "null" if bias is None else bias,
            "model.towers.image.options": f"{{layers: 1, width: 32, head_width: 16, patch_dropout: {patch_dropout}}}",
            "model.towers.text.options": "{layers: 1, width: 32, heads: 2}",
        }
    ).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 49000, (BATCH, 16), generator=g),
    }


def engine_for(model):
    cfg = tiny_config()
    return TorchEngine(model, cfg.optim, cfg.run.steps)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def chunked_full_graph(model, loss_fn, inputs, chunk_sizes):
    """Reference: the same chunks, in the same order (so the same random draws), all kept in one graph."""
    embeddings = {
        m: torch.cat([model.encode(m, c) for c in inputs[m].split(chunk_sizes[m])]) for m in ("image", "text")
    }
    out = loss_fn(embeddings, *model.similarity())
    out["loss"].backward()
    return out["loss"].detach()


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=name)


LOSSES = [("infonce", None), ("infonce_tiled", None), ("siglip", -10.0), ("dcl", None), ("hn_nce", None), ("hcl", None)]


@pytest.mark.parametrize("name, bias", LOSSES)
def test_equals_plain_full_batch_step_without_randomness(name, bias):
    loss_fn = build_loss(LossConfig(name=name, chunk_size=5))
    model = one_layer_model(bias=bias)
    plain = plain_backward(engine_for(model), loss_fn, batch(), NO_AUTOCAST)["loss"]
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cached = GradCache({"image": 5, "text": 4})(engine_for(model), loss_fn, batch(), NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    assert "similarity.logit_scale" in expected and (bias is None or "similarity.logit_bias" in expected)


@pytest.mark.parametrize("name, bias", LOSSES)
def test_equals_full_graph_with_random_masking_on(name, bias):
    loss_fn = build_loss(LossConfig(name=name, chunk_size=5))
    chunks = {"image": 5, "text": 3}
    model = one_layer_model(patch_dropout=0.5, bias=bias)
    model.train()
    torch.manual_seed(123)
    reference_loss = chunked_full_graph(model, loss_fn, batch(), chunks)
    expected, rng_after_reference = grads(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    cached = GradCache(chunks)(engine_for(model), loss_fn, batch(), NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, reference_loss, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # the run goes on as after one forward

    # The masking really is random: another draw gives other gradients, so the replay is what matched them.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(321)
    GradCache(chunks)(engine_for(model), loss_fn, batch(), NO_AUTOCAST)
    assert not torch.allclose(
        grads(model)["towers.image.encoder.conv1.weight"], expected["towers.image.encoder.conv1.weight"]
    )


class CountingEngine(TorchEngine):
    def backward(self, loss):
        self.calls = getattr(self, "calls", 0) + 1
        super().backward(loss)


def test_a_frozen_tower_is_embedded_once_and_never_replayed():
    loss_fn = build_loss(LossConfig(name="infonce"))
    model = one_layer_model()
    model.towers["text"].requires_grad_(False)  # frozen whole, as ImageBind's binding keeps it
    plain = plain_backward(engine_for(model), loss_fn, batch(), NO_AUTOCAST)["loss"]
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cache = GradCache({"image": 5, "text": 4}, frozen=["text"])
    engine = CountingEngine(model, tiny_config().optim, 1)
    cached = cache(engine, loss_fn, batch(), NO_AUTOCAST)["loss"]
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=0)
    assert_same_grads(grads(model), expected)
    assert not any(name.startswith("towers.text.") for name in expected)
    # Image chunks of 5, 5, 2: three backward calls, as the engine is told; the text chunks add none.
    assert engine.calls == 3 == cache.micro_steps(["image", "text"], BATCH)


def test_training_with_grad_cache_follows_the_plain_loss_curve(tmp_path, digits_root):
    def run(name, extra):
        overrides = tiny_overrides(
            f"{digits_root}/train/{{000000..000005}}.tar",
            **{
                "run.output_dir": tmp_path,
                "run.name": name,
                "run.steps": 8,
                "run.checkpoint_every": 100,
                "optim.warmup_steps": 2,
                "optim.lr": 1e-3,
                "data.batch_size": 24,
                **extra,
            },
        )
        run_dir = train(config_lib.load(None, overrides)).run_dir
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain", {})
    cached = run("cached", {"engine.grad_cache.image": 8, "engine.grad_cache.text": 5})
    assert len(plain) == 8
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-5)
