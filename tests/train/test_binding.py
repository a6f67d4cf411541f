"""ImageBind's binding (configs/bind_audio.yaml): a fresh audio tower trained against the frozen image and
text towers of a finished run (model.init_from its run directory), from audio-caption pairs alone. The
frozen towers take no samples and leave the run bitwise unchanged; the audio tower learns."""

from data_prep.writer import brace_pattern
from mmcl.checkpoint import state as checkpoints
from mmcl.cli import main
from mmcl.train.metrics_log import read_records

from conftest import REPO


def test_an_audio_tower_binds_to_a_frozen_image_text_run(digits_run, spoken_digits_root, tmp_path):
    audio_text = spoken_digits_root / "train" / "audio_text"
    urls = brace_pattern(audio_text, len(list(audio_text.glob("*.tar"))))
    overrides = {
        "data.sources": f"[{{urls: '{urls}', modalities: [audio, text]}}]",
        "data.batch_size": 32,
        "data.workers": 0,
        "data.shuffle_buffer": 200,
        "run.progress": False,
        "run.log_every": 1,
        "run.output_dir": tmp_path,
        "run.name": "bound",
        "run.steps": 40,
        "model.init_from": digits_run,  # a run directory: its latest checkpoint
        "model.embed_dim": 64,  # digits_run's
        "engine.grad_cache": "{audio: 8, text: 16}",
        "optim.warmup_steps": 5,
        "eval.datasets": "[]",
    }
    assert main(["train", str(REPO / "configs/bind_audio.yaml"), *[f"{k}={v}" for k, v in overrides.items()]]) == 0

    before = checkpoints.load_weights(checkpoints.latest(digits_run))
    after = checkpoints.load_weights(checkpoints.latest(tmp_path / "bound"))
    frozen = [k for k in before if k.startswith(("towers.image.", "towers.text."))]
    assert frozen and all(after[k].equal(before[k]) for k in frozen)
    assert not any(k.startswith("towers.audio.") for k in before) and any(k.startswith("towers.audio.") for k in after)

    records = read_records(tmp_path / "bound" / "metrics.jsonl")
    assert len(records) == 40 and "image-text" not in records[-1]
    first, last = (sum(r["audio-text"] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last < 0.8 * first, (first, last)  # the audio tower learns to meet the frozen text tower
