"""Conversion: mmcl -> open_clip gives equal logits, the round trip is identical, ZeRO shards
consolidate (by DeepSpeed's tool) to the weights the training processes held."""

import json

import open_clip
import pytest
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file

from mmcl import config as config_lib
from mmcl.checkpoint import convert
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.init_from import load_initial_weights
from mmcl.cli import main
from mmcl.config import ModelConfig, TowerConfig
from mmcl.errors import ConfigError
from mmcl.models import MultiEncoder
from mmcl.train.trainer import train

from conftest import REPO, tiny_config, tiny_overrides
from launch import launch


def mmcl_logits(model, images, tokens):
    embeddings, scale, _ = model({"image": images, "text": tokens})
    return scale * embeddings["image"] @ embeddings["text"].T  # (B, B)


@pytest.mark.parametrize("bias", [None, -5.0])
def test_exported_model_gives_the_same_logits_in_open_clip(tmp_path, bias):
    cfg = tiny_config(**({"model.init_logit_bias": bias} if bias is not None else {}))
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).eval()
    with torch.no_grad():  # move the scale off its initial value, so a dropped parameter would show
        model.similarity.logit_scale.fill_(3.3)
    config_path, weights = convert.export_open_clip(model.state_dict(), cfg, tmp_path, f"exported{bias}")
    open_clip.add_model_config(config_path)
    theirs = open_clip.create_model(f"exported{bias}", pretrained=str(weights)).eval()

    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=g)
    tokenize = model.preprocessors(train=False)["text"]
    tokens = torch.stack(
        [
            tokenize(t)
            for t in [
                "a photo of the number seven",
                "handwritten 3",
                "zero",
                "the digit nine",
                "a scan of a one",
                "five",
            ]
        ]
    )
    reference_tokens = open_clip.get_tokenizer(f"exported{bias}")(
        ["a photo of the number seven", "handwritten 3", "zero", "the digit nine", "a scan of a one", "five"]
    )
    assert torch.equal(tokens, reference_tokens)  # each side's own tokenizer
    with torch.no_grad():
        image_features = theirs.encode_image(images, normalize=True)
        text_features = theirs.encode_text(reference_tokens, normalize=True)
        their_logits = theirs.logit_scale.exp() * image_features @ text_features.T
        torch.testing.assert_close(mmcl_logits(model, images, tokens), their_logits, atol=1e-4, rtol=0)
    if bias is not None:
        assert theirs.logit_bias.item() == bias


def test_round_trip_is_identical():
    cfg = tiny_config(**{"model.init_logit_bias": -10.0})
    state = MultiEncoder(cfg.model).state_dict()
    back = convert.from_open_clip_state(convert.to_open_clip_state(state))
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key
    MultiEncoder(cfg.model).load_state_dict(back)  # and it loads


def test_an_open_clip_model_imports_as_mmcl_towers():
    cfg = tiny_config()
    torch.manual_seed(3)
    theirs = open_clip.create_model("mmcl-tiny").eval()
    ours = MultiEncoder(cfg.model.__class__(embed_dim=128, towers=cfg.model.towers)).eval()
    ours.load_state_dict(convert.from_open_clip_state(theirs.state_dict()))
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 4000, (3, 16))
    with torch.no_grad():
        expected = (
            theirs.logit_scale.exp()
            * theirs.encode_image(images, normalize=True)
            @ theirs.encode_text(tokens, normalize=True).T
        )
        torch.testing.assert_close(mmcl_logits(ours, images, tokens), expected, atol=1e-5, rtol=0)


def test_models_open_clip_cannot_express_fail_clearly():
    cfg = tiny_config(**{"model.towers.depth.type": "open_clip_vision", "data.fields.depth": "png"})
    with pytest.raises(ConfigError, match="depth"):
        convert.open_clip_model_config(cfg)


def zero3_worker(rank, world, overrides):
    train(config_lib.load(None, overrides))
    torch_dist.destroy_process_group()


def test_zero3_checkpoint_from_two_processes_consolidates_to_the_trained_weights(tmp_path, digits_root):
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": tmp_path,
            "run.name": "z3",
            "run.steps": 3,
            "data.batch_size": 8,
            "engine.backend": "deepspeed",
            "engine.zero_stage": 3,
        },
    )
    launch(zero3_worker, 2, overrides)
    checkpoint = checkpoints.latest(tmp_path / "z3")
    assert main(["convert", "zero-fp32", str(tmp_path / "z3"), "--out", str(tmp_path / "fp32.safetensors")]) == 0
    consolidated = load_file(tmp_path / "fp32.safetensors")
    held = checkpoints.load_weights(checkpoint)  # gathered from the live shards at save time
    assert consolidated.keys() == held.keys()
    for key in held:
        torch.testing.assert_close(consolidated[key], held[key].float(), rtol=0, atol=0, msg=key)

    # and the CLI's open_clip export of the same run
    assert main(["convert", "open-clip", str(tmp_path / "z3"), "--out", str(tmp_path / "oc")]) == 0
    assert json.loads((tmp_path / "oc" / "z3.json").read_text())["embed_dim"] == 64


def hf_ready_config():
    """mmcl-tiny with class-token pooling: what a CLIPModel can express."""
    return tiny_config(**{"model.towers.image.options.pool_type": "tok"})


def test_hf_clip_export_gives_the_same_logits_and_imports_back(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from mmcl.checkpoint.hf_clip import export_hf_clip, import_hf_clip

    cfg = hf_ready_config()
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).eval()
    with torch.no_grad():
        model.similarity.logit_scale.fill_(3.1)
    out = export_hf_clip(model.state_dict(), cfg, tmp_path / "hf")
    theirs = CLIPModel.from_pretrained(out).eval()
    tokenizer = CLIPTokenizer.from_pretrained(out)

    prompts = ["a photo of the number seven", "handwritten 3", "zero", "the digit nine", "a scan of a one", "five"]
    tokenize = model.preprocessors(train=False)["text"]
    tokens = torch.stack([tokenize(t) for t in prompts])
    hf_tokens = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    eot = tokens.argmax(dim=1)  # each side's own tokenizer: the same ids up to the end of text
    for row, end in enumerate(eot):
        assert torch.equal(tokens[row, : end + 1], hf_tokens[row, : end + 1])
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        their_logits = theirs(input_ids=hf_tokens, pixel_values=images).logits_per_image  # (6, 6)
        torch.testing.assert_close(mmcl_logits(model, images, tokens), their_logits, atol=1e-4, rtol=0)

    state, imported_cfg = import_hf_clip(out)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    again = MultiEncoder(imported_cfg.model).eval()
    again.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(mmcl_logits(again, images, tokens), mmcl_logits(model, images, tokens))


@pytest.mark.parametrize(
    "override, key",
    [
        ({}, "model.towers.image.options.pool_type"),  # mmcl-tiny pools by average
        ({"model.towers.image.options.pool_type": "tok", "model.init_logit_bias": -10.0}, "model.init_logit_bias"),
    ],
)
def test_hf_export_names_what_clipmodel_cannot_express(tmp_path, override, key):
    from mmcl.checkpoint.hf_clip import export_hf_clip

    cfg = tiny_config(**override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        export_hf_clip(MultiEncoder(cfg.model).state_dict(), cfg, tmp_path)


def test_training_starts_from_an_open_clip_checkpoint(tmp_path, digits_root):
    torch.manual_seed(5)
    theirs = open_clip.create_model("mmcl-tiny")
    torch.save(theirs.state_dict(), tmp_path / "start.pt")
    overrides = tiny_overrides(
        f"{digits_root}/train/000000.tar",
        **{
            "run.output_dir": tmp_path,
            "run.name": "init",
            "run.steps": 1,
            "optim.lr": 0.0,
            "model.embed_dim": 128,
            "model.init_from": tmp_path / "start.pt",
        },
    )
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 0
    trained = load_file(checkpoints.latest(tmp_path / "init") / "model.safetensors")
    expected = convert.from_open_clip_state(theirs.state_dict())
    for key, value in expected.items():  # lr 0: the run's weights are the checkpoint's
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)

    wrong = tiny_overrides(
        f"{digits_root}/train/000000.tar",
        **{"run.output_dir": tmp_path, "run.name": "wrong", "model.init_from": tmp_path / "start.pt"},
    )  # embed_dim 64
    assert main(["train", str(REPO / "configs/digits.yaml"), *wrong]) == 2


def test_initial_weights_leave_missing_towers_fresh(tmp_path):
    image_text = MultiEncoder(tiny_config().model)
    torch.save(convert.to_open_clip_state(image_text.state_dict()), tmp_path / "it.pt")
    three = MultiEncoder(
        ModelConfig(
            embed_dim=64,
            towers={
                "image": TowerConfig(type="open_clip_vision", preset="mmcl-tiny", options={"patch_dropout": 0.0}),
                "text": TowerConfig(type="open_clip_text", preset="mmcl-tiny"),
                "audio": TowerConfig(type="audio_spectrogram", preset="mmcl-tiny"),
            },
        )
    )
    fresh = load_initial_weights(three, tmp_path / "it.pt")
    assert fresh and all(k.startswith("towers.audio.") for k in fresh)
    for key, value in image_text.state_dict().items():
        assert torch.equal(three.state_dict()[key], value)
