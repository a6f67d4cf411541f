"""QuickGELU travels with the model: open_clip architectures that use it (every OpenAI CLIP checkpoint)
load into mmcl with it, mmcl presets can ask for it, and open_clip and CLIPModel exports keep it."""

import open_clip
import pytest
import torch

from mmcl import config as config_lib
from mmcl.checkpoint import convert
from mmcl.checkpoint.init_from import load_initial_weights
from mmcl.models import MultiEncoder

from conftest import tiny_overrides

PROMPTS = ["a photo of a dog", "handwritten 3", "zero", "the digit nine"]


def embeddings_of_open_clip(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def embeddings_of_mmcl(model, images, tokens):
    with torch.no_grad():
        return model.encode("image", images), model.encode("text", tokens)


def inputs_for(architecture, count=2):
    cfg = open_clip.get_model_config(architecture)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, open_clip.get_tokenizer(architecture)(PROMPTS[:count])


def assert_same_embeddings(ours, theirs):
    for mine, reference in zip(ours, theirs, strict=False):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def vit_b_32_quickgelu(tmp_path_factory):
    """open_clip's ViT-B-32-quickgelu with random weights, and its checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    path = tmp_path_factory.mktemp("quickgelu") / "ViT-B-32-quickgelu.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_architecture_loads_with_its_quickgelu(vit_b_32_quickgelu):
    """What `mmcl eval FILE --open-clip ViT-B-32-quickgelu` evaluates."""
    theirs, path = vit_b_32_quickgelu
    ours, _ = convert.open_clip_as_mmcl("ViT-B-32-quickgelu", path)
    images, tokens = inputs_for("ViT-B-32-quickgelu")
    assert_same_embeddings(
        embeddings_of_mmcl(ours.eval(), images, tokens), embeddings_of_open_clip(theirs, images, tokens)
    )


def test_init_from_an_open_clip_quickgelu_checkpoint(vit_b_32_quickgelu):
    theirs, path = vit_b_32_quickgelu
    cfg = config_lib.load(
        None,
        tiny_overrides(
            "unused.tar",
            **{
                "model.embed_dim": 512,
                "model.towers.image.preset": "ViT-B-32-quickgelu",
                "model.towers.text.preset": "ViT-B-32-quickgelu",
                "model.init_from": path,
            },
        ),
    )
    ours = MultiEncoder(cfg.model)
    assert load_initial_weights(ours, path) == []
    images, tokens = inputs_for("ViT-B-32-quickgelu")
    assert_same_embeddings(
        embeddings_of_mmcl(ours.eval(), images, tokens), embeddings_of_open_clip(theirs, images, tokens)
    )


def tiny_quickgelu_config(**extra):
    return config_lib.load(
        None,
        tiny_overrides(
            "unused.tar",
            **{
                "model.embed_dim": 128,
                "model.towers.image.preset": "mmcl-tiny-quickgelu",
                "model.towers.text.preset": "mmcl-tiny-quickgelu",
                **extra,
            },
        ),
    )


def test_a_quickgelu_preset_builds_open_clips_model():
    torch.manual_seed(3)
    theirs = open_clip.create_model("mmcl-tiny-quickgelu").eval()
    ours = MultiEncoder(tiny_quickgelu_config().model).eval()
    ours.load_state_dict(convert.from_open_clip_state(theirs.state_dict()))
    images, tokens = inputs_for("mmcl-tiny-quickgelu", count=4)
    assert_same_embeddings(embeddings_of_mmcl(ours, images, tokens), embeddings_of_open_clip(theirs, images, tokens))


def test_quickgelu_is_an_option_of_each_tower():
    cfg = tiny_quickgelu_config(**{"model.towers.text.options.quick_gelu": False})
    model = MultiEncoder(cfg.model)
    image_activation = model.tower("image").encoder.transformer.resblocks[0].mlp.gelu
    text_activation = model.tower("text").encoder.transformer.resblocks[0].mlp.gelu
    assert isinstance(image_activation, open_clip.transformer.QuickGELU)
    assert isinstance(text_activation, torch.nn.GELU)


def test_open_clip_export_keeps_quickgelu(tmp_path):
    cfg = tiny_quickgelu_config()
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).eval()
    config_path, weights = convert.export_open_clip(model.state_dict(), cfg, tmp_path, "exported-quickgelu")
    open_clip.add_model_config(config_path)
    assert open_clip.get_model_config("exported-quickgelu")["quick_gelu"] is True
    theirs = open_clip.create_model("exported-quickgelu", pretrained=str(weights)).eval()
    images, tokens = inputs_for("mmcl-tiny-quickgelu", count=4)
    assert_same_embeddings(embeddings_of_mmcl(model, images, tokens), embeddings_of_open_clip(theirs, images, tokens))


def test_hugging_face_round_trip_keeps_quickgelu(tmp_path):
    from transformers import CLIPModel

    from mmcl.checkpoint.hf_clip import export_hf_clip, import_hf_clip

    cfg = tiny_quickgelu_config(**{"model.towers.image.options.pool_type": "tok"})
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).eval()
    out = export_hf_clip(model.state_dict(), cfg, tmp_path / "hf")
    theirs = CLIPModel.from_pretrained(out).eval()
    assert theirs.config.vision_config.hidden_act == theirs.config.text_config.hidden_act == "quick_gelu"
    images, tokens = inputs_for("mmcl-tiny-quickgelu", count=4)
    with torch.no_grad():  # the projected embeddings (transformers 5 returns them as the pooler output)
        hf_image = torch.nn.functional.normalize(theirs.get_image_features(pixel_values=images).pooler_output, dim=-1)
        hf_text = torch.nn.functional.normalize(theirs.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    assert_same_embeddings(embeddings_of_mmcl(model, images, tokens), (hf_image, hf_text))

    state, imported_cfg = import_hf_clip(out)
    again = MultiEncoder(imported_cfg.model).eval()
    again.load_state_dict(state)
    assert imported_cfg.model.towers["image"].options["quick_gelu"] is True
    assert_same_embeddings(embeddings_of_mmcl(again, images, tokens), embeddings_of_mmcl(model, images, tokens))
