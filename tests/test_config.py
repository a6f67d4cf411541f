import re
import subprocess
import sys

import pytest

from mmcl import config as config_lib
from mmcl.errors import ConfigError
from mmcl.train.trainer import check_config

from conftest import REPO, tiny_overrides

SHARD = REPO / "tests" / "data" / "empty.tar"  # an existing (empty) shard: these tests are about the config


def load_and_check(overrides):
    """What `mmcl train` does before any compute: load the values, then every component's check."""
    check_config(config_lib.load(None, overrides))


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {steps: 7}\noptim: {lr: 0.01}\n")
    cfg = config_lib.load(path, tiny_overrides("x/{0..1}.tar", **{"optim.lr": 0.02}))
    assert cfg.run.steps == 7  # from YAML
    assert cfg.optim.lr == 0.02  # the override wins over YAML
    assert cfg.optim.weight_decay == config_lib.OptimConfig().weight_decay  # default kept
    assert cfg.model.towers["image"].preset == "mmcl-tiny"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nonsense=1", "nonsense"),
        ("model.towers.image.presett=x", "model.towers.image.presett"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.load(None, tiny_overrides("x.tar") + [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"data\.batch_sise"):
        config_lib.load(path, tiny_overrides("x.tar"))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        config_lib.load(None, tiny_overrides("x.tar", **{"data.batch_size": "many"}))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.towers.image.type=resnet_pp", "model.towers.image.type"),
        ("model.towers.image.options.widthh=3", "model.towers.image.options.widthh"),
        ("model.towers.text.preset=NoSuchModel", "model.towers.text.preset"),
        ("loss.name=triplet", "loss.name"),
        ("optim.schedule=linear", "optim.schedule"),
        ("data.batch_size=0", "data.batch_size"),
        ("loss.pairs=[image-audio]", "loss.pairs"),
        ("loss.pairs=[image-image]", "loss.pairs"),
        ("loss.anchor=audio", "loss.anchor"),
        ("loss.name=symile", "loss.name"),
        ("loss.siglip_exchange=allreduce", "loss.siglip_exchange"),
        ("loss.positive_aggregation=median", "loss.positive_aggregation"),
        ("loss.pair_weights.image-audio=2", "loss.pair_weights.image-audio"),
        ("loss.tau_plus=1.0", "loss.tau_plus"),
        ("engine.grad_cache.image=64", "engine.grad_cache.image"),
        ("engine.grad_cache.audio=4", "engine.grad_cache.audio"),
        ("data.optional_modalities=[audio]", "data.optional_modalities"),
        ("loss.symile_negatives=n_cubed", "loss.symile_negatives"),
        ("loss.beta=-1", "loss.beta"),
        ("loss.tau_plus=nan", "loss.tau_plus"),
        ("data.fields.image=;", "data.fields.image"),
        ("data.fields.image=txt", "data.fields.image"),  # a text field cannot hold an image
        ("loss.same_modality_negatives=true", None),  # offered by infonce (the default loss)
        ("loss.name=hn_nce", None),
        ("model.towers.image.options.patch_size=4", None),  # valid: a control for the list's neighbours
        ("engine.precision=fp8", "engine.precision"),
        ("engine.loss_scale.min_loss_scale=0", "engine.loss_scale.min_loss_scale"),
        ("engine.loss_scale.loss_scale_window=0", "engine.loss_scale.loss_scale_window"),
        ("engine.loss_scale.hysteresis=0", "engine.loss_scale.hysteresis"),
        ("engine.loss_scale.initial_scale_power=-1", "engine.loss_scale.initial_scale_power"),
        ("engine.loss_scale.initial_scale_power=2", None),  # the default floor 1 is below 2**2
        ("engine.precision=fp16", None),
        ("engine.compile=true", None),
    ],
)
def test_semantic_errors_are_named(override, key):
    if key is None:
        load_and_check(tiny_overrides(str(SHARD)) + [override])
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_and_check(tiny_overrides(str(SHARD)) + [override])


AUDIO = ["model.towers.audio.type=audio_spectrogram", "model.towers.audio.preset=mmcl-tiny"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.towers.audio.preset=huge"], "model.towers.audio.preset"),
        (["model.towers.audio.options.n_mels=30"], "model.towers.audio.options"),  # not a multiple of patch_freq
        (["model.towers.audio.options.mels=30"], "model.towers.audio.options.mels"),
        (["data.optional_modalities=[image,audio]", "loss.name=symile"], "loss.name"),
        (["data.optional_modalities=[image]", "loss.name=siglip", "loss.siglip_exchange=ring"], "loss.name"),
        (["loss.name=siglip", "loss.same_modality_negatives=true"], "loss.same_modality_negatives"),
        (["loss.name=symile", "loss.same_modality_negatives=true"], "loss.same_modality_negatives"),
        (["loss.same_modality_negatives=true", "loss.label_smoothing=0.1"], "loss.label_smoothing"),
        (["model.towers.image.options.quick_gelu=maybe"], "model.towers.image.options"),
    ],
)
def test_audio_and_missing_modality_errors_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_and_check(tiny_overrides(str(SHARD)) + AUDIO + overrides)
    load_and_check(tiny_overrides(str(SHARD)) + AUDIO + ["data.optional_modalities=[image,audio]"])


def test_training_data_is_required():
    with pytest.raises(ConfigError, match=r"data\.train.*neither is set"):
        load_and_check(tiny_overrides("''"))


def sources(*items):
    return "data.sources=[" + ",".join("{" + ",".join(f"{k}: {v}" for k, v in i.items()) + "}" for i in items) + "]"


IMAGE_TEXT = {"urls": str(SHARD), "weight": 0.5}


@pytest.mark.parametrize(
    "overrides, key, named",
    [
        ([sources(IMAGE_TEXT)], "data.train", "not both"),
        (["data.train=''", sources({**IMAGE_TEXT, "weight": 0})], "data.sources[0].weight", "above 0"),
        (["data.train=''", sources({**IMAGE_TEXT, "weight": -1})], "data.sources[0].weight", "at least 0"),
        (["data.train=''", sources({**IMAGE_TEXT, "modalities": "[image, audio]"})], "data.sources[0]", "'audio'"),
        (["data.train=''", sources({**IMAGE_TEXT, "modalities": "[image]"})], "data.sources[0].modalities", "two"),
        (["data.train=''", sources(IMAGE_TEXT, {"urls": "/nowhere/a.tar"})], "data.sources[1].urls", "/nowhere/a.tar"),
        (
            ["data.train=''", sources({**IMAGE_TEXT, "fields": "{text: png}"})],
            "data.sources[0].fields.text",
            "cannot hold text",
        ),
        (["data.train=''", sources({**IMAGE_TEXT, "fieldz": "{}"})], "data.sources[0].fieldz", ""),
        (["data.train=''", sources({**IMAGE_TEXT, "weight": "many"})], "data.sources[0].weight", "many"),
        (["data.train=''", sources({**IMAGE_TEXT, "weight": "inf"})], "data.sources[0].weight", "finite"),
        (["data.train=''", *AUDIO, sources({**IMAGE_TEXT, "modalities": "[image, text]"})], "data.sources", "'audio'"),
        (["data.train=''", "data.sources=[3]"], "data.sources[0]", "a mapping"),
        (["data.train=pipe:cat a.tar", "data.resampled=true"], "data.epoch_samples", "sizes.json"),
    ],
)
def test_source_errors_are_named(overrides, key, named):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(named)):
        load_and_check(tiny_overrides(str(SHARD)) + overrides)


def test_a_tower_no_source_holds_must_be_frozen_whole():
    audio_text = sources({**IMAGE_TEXT, "modalities": "[audio, text]"})
    load_and_check(
        tiny_overrides("''") + AUDIO + [audio_text, "model.towers.image.locked=true", "data.epoch_samples=64"]
    )
    partly = ["model.towers.image.locked=true", "model.towers.image.unlocked_blocks=1"]
    for settings in ([], ["model.towers.image.locked=false"], partly):
        with pytest.raises(ConfigError, match=r"'data\.sources'.*'image'.*model\.towers\.image\.locked"):
            load_and_check(tiny_overrides("''") + AUDIO + [audio_text, *settings])


def test_sources_with_an_epoch_length_pass_the_checks():
    image_text = {**IMAGE_TEXT, "fields": "{text: 'json:caption'}"}
    load_and_check(tiny_overrides("''") + [sources(IMAGE_TEXT, image_text), "data.epoch_samples=1000"])


def test_yaml_round_trip():
    cfg = config_lib.load(None, tiny_overrides("a/{0..3}.tar", **{"model.towers.image.options.layers": 1}))
    again = config_lib.from_yaml(config_lib.to_yaml(cfg))
    assert again == cfg
    assert again.model.towers["image"].options == {"layers": 1}


def test_cli_rejects_bad_key_before_any_compute(tmp_path):
    # The shards do not exist: the run must stop at the config, not at the data.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmcl",
            "train",
            "configs/digits.yaml",
            "optim.warmup=3",
            f"run.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "optim.warmup" in result.stderr
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_bundled_configs_are_found_by_name_and_start_new_runs(tmp_path):
    assert config_lib.config_path("digits") == config_lib.BUNDLED / "digits.yaml"
    assert config_lib.config_path(REPO / "configs" / "digits.yaml").is_file()  # a path is taken as it is
    with pytest.raises(
        ConfigError,
        match="digits, digits_captions_all, digits_captions_one, digits_distilled, digits_simclr, digits_slip, "
        "digits_student, digits_teacher, openclipart, spoken_digits",
    ):
        config_lib.config_path("no-such-config")
    starter = tmp_path / "mine.yaml"
    starter.write_text(config_lib.starter_yaml("mine", "spoken_digits"))
    cfg = config_lib.load(starter)
    assert cfg.run.name == "mine" and cfg.model.towers["audio"].type == "audio_spectrogram"


@pytest.mark.parametrize(
    "train, named",
    [
        ("/nowhere/{000000..000003}.tar", "4 of the 4 shards it names do not exist, first /nowhere/000000.tar"),
        (f"{SHARD}::/nowhere/extra.tar", "1 of the 2 shards it names do not exist, first /nowhere/extra.tar"),
    ],
)
def test_missing_training_shards_stop_the_run_before_any_compute(tmp_path, train, named):
    with pytest.raises(ConfigError, match=r"config key 'data\.train': " + re.escape(named)):
        load_and_check(tiny_overrides(train))
    result = subprocess.run(
        [sys.executable, "-m", "mmcl", "train", "digits", f"data.train={train}", f"run.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_a_config_built_in_python_is_checked_too():
    cfg = config_lib.load(None, tiny_overrides(str(SHARD)))
    cfg.engine.precision = "fp8"  # never through load()
    with pytest.raises(ConfigError, match=r"engine\.precision"):
        check_config(cfg)


def test_a_loss_scale_floor_above_its_start_is_named():
    overrides = ["engine.loss_scale.initial_scale_power=3", "engine.loss_scale.min_loss_scale=16"]  # 16 > 2**3
    with pytest.raises(ConfigError, match=r"engine\.loss_scale\.min_loss_scale"):
        load_and_check(tiny_overrides(str(SHARD)) + overrides)
