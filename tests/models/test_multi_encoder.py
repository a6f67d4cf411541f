import open_clip
import pytest
import torch
from PIL import Image

from mmcl.config import ModelConfig, TowerConfig
from mmcl.models import TOWERS, MultiEncoder

from conftest import tiny_model


def test_forward_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = tiny_model(**{"model.embed_dim": 32})
    images = torch.randn(5, 3, 32, 32)  # (B, 3, H, W) at the preset's image size
    tokens = torch.randint(0, 49408, (5, 16))  # (B, context_length)
    out, logit_scale, logit_bias = model({"image": images, "text": tokens, "label": torch.zeros(5)})
    assert set(out) == {"image", "text"}  # inputs without a tower are ignored
    for emb in out.values():
        assert emb.shape == (5, 32)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    assert logit_scale.shape == () and logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert logit_bias is None


def test_logit_bias_and_scale_clamp():
    model = MultiEncoder(
        ModelConfig(
            embed_dim=8,
            init_logit_scale=9.0,
            init_logit_bias=-10.0,
            towers={
                "image": TowerConfig(type="open_clip_vision", preset="mmcl-tiny"),
                "text": TowerConfig(type="open_clip_text", preset="mmcl-tiny"),
            },
        )
    )
    _, logit_scale, logit_bias = model({})
    assert logit_scale.item() == pytest.approx(100.0)  # clamped at CLIP's maximum, 100
    assert logit_bias.item() == -10.0


def test_options_override_the_preset():
    model = tiny_model(**{"model.towers.image.options": "{layers: 1, width: 64, head_width: 16}"})
    encoder = model.tower("image").encoder
    assert len(encoder.transformer.resblocks) == 1 and encoder.transformer.width == 64


def test_preprocessors_turn_decoded_values_into_tower_inputs():
    model = tiny_model()
    image = Image.new("RGB", (8, 8), color=(200, 10, 10))
    for train in (True, False):
        prep = model.preprocessors(train)
        assert prep["image"](image).shape == (3, 32, 32)
        tokens = prep["text"]("handwritten seven")
        assert tokens.shape == (16,) and tokens.dtype == torch.long


def test_locked_tower_gets_no_gradient():
    model = MultiEncoder(
        ModelConfig(
            embed_dim=32,
            towers={
                "image": TowerConfig(type="open_clip_vision", preset="mmcl-tiny", locked=True),
                "text": TowerConfig(type="open_clip_text", preset="mmcl-tiny"),
            },
        )
    )
    out, _, _ = model({"image": torch.randn(2, 3, 32, 32), "text": torch.randint(0, 100, (2, 16))})
    (out["image"] * out["text"]).sum().backward()
    assert all(p.grad is None for p in model.tower("image").parameters())
    assert any(p.grad is not None for p in model.tower("text").parameters())


def test_towers_are_open_clip_modules_and_presets_are_open_clip_configs():
    model = tiny_model()
    assert isinstance(model.tower("image").encoder, open_clip.model.VisionTransformer)
    assert isinstance(model.tower("text").encoder, open_clip.model.TextTransformer)
    reference = open_clip.create_model("mmcl-tiny")  # the preset is usable from open_clip itself
    assert reference.visual.transformer.width == model.tower("image").encoder.transformer.width


def test_a_new_modality_is_added_by_registry_alone():
    name = "test_mean_pool_tower"

    @TOWERS.register(name)
    class MeanPool(torch.nn.Module):
        input_kind = "image"

        def __init__(self, cfg, embed_dim):
            super().__init__()
            self.proj = torch.nn.Linear(3, embed_dim)

        def forward(self, x):
            return self.proj(x.mean(dim=(2, 3)))  # (B, 3, H, W) -> (B, 3) -> (B, D)

        @classmethod
        def check(cls, cfg, key):
            pass

    model = MultiEncoder(
        ModelConfig(
            embed_dim=16,
            towers={"depth": TowerConfig(type=name), "text": TowerConfig(type="open_clip_text", preset="mmcl-tiny")},
        )
    )
    out, _, _ = model({"depth": torch.randn(3, 3, 4, 4), "text": torch.randint(0, 100, (3, 16))})
    assert out["depth"].shape == (3, 16)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        torch.manual_seed(0)
        towers = {
            m: TowerConfig(
                type=f"open_clip_{kind}",
                preset="mmcl-tiny",
                grad_checkpointing=checkpointing,
                options={"patch_dropout": 0.3} if kind == "vision" else {},
            )
            for m, kind in (("image", "vision"), ("text", "text"))
        }
        model = MultiEncoder(ModelConfig(embed_dim=16, towers=towers))
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(5)
        out, scale, _ = model(
            {"image": torch.randn(4, 3, 32, 32, generator=g), "text": torch.randint(0, 99, (4, 16), generator=g)}
        )
        (scale * out["image"] @ out["text"].T).logsumexp(1).sum().backward()
        assert model.tower("image").encoder.transformer.grad_checkpointing is checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def three_towers() -> MultiEncoder:
    return MultiEncoder(
        ModelConfig(
            embed_dim=32,
            towers={
                "image": TowerConfig(type="open_clip_vision", preset="mmcl-tiny"),
                "text": TowerConfig(type="open_clip_text", preset="mmcl-tiny"),
                "audio": TowerConfig(type="audio_spectrogram", preset="mmcl-tiny"),
            },
        )
    )


def test_audio_tower_turns_a_waveform_into_an_embedding():
    import numpy as np

    model = three_towers()
    wave = (0.3 * np.sin(np.arange(30000) * 0.05)).astype(np.float32)  # 1.4 s at 22.05 kHz
    spectrogram = model.preprocessors(train=False)["audio"]((wave, 22050))
    assert spectrogram.shape == model.tower("audio").placeholder().shape == (32, 61)  # 1.2 s of 20 ms frames
    emb, _, _ = model({"audio": spectrogram[None]})
    assert emb["audio"].shape == (1, 32)


def test_three_towers_train_on_a_batch_with_missing_modalities():
    """Samples hold image+text or audio+text: a forward/backward through all three towers in which the
    placeholder rows change nothing, neither the loss nor any gradient."""
    from mmcl.config import LossConfig
    from mmcl.losses import build_loss

    torch.manual_seed(0)
    model = three_towers()
    loss_fn = build_loss(LossConfig(pairs=["image-text", "audio-text"]))
    present = {
        "image": torch.tensor([True, True, True, False, False, False]),
        "audio": torch.tensor([False, False, False, True, True, True]),
    }
    real = {
        "image": torch.randn(6, 3, 32, 32),
        "text": torch.randint(0, 49408, (6, 16)),
        "audio": torch.randn(6, 32, 61),
    }

    def loss_and_grads(filler):
        inputs = {
            m: torch.where(present[m].view(-1, *[1] * (x.ndim - 1)), x, filler(x)) if m in present else x
            for m, x in real.items()
        }
        model.zero_grad()
        out = loss_fn(*model(inputs), present=present)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = loss_and_grads(torch.zeros_like)
    other_out, other_grads = loss_and_grads(lambda x: torch.randn_like(x) * 5)
    assert set(out) == {"loss", "image-text", "audio-text"} and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], other_out["loss"])
    for tower in ("image", "text", "audio"):
        assert any(n.startswith(f"towers.{tower}.") and g.abs().sum() > 0 for n, g in grads.items())
    assert grads.keys() == other_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], other_grads[name], rtol=1e-4, atol=1e-6)
