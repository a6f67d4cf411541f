"""A tiny tri-modal run via the CLI: image-text and audio-text pairs only, then zero-shot evaluation of
every modality and retrieval for every modality pair, image-audio included."""

import json
from pathlib import Path

from mmcl.cli import main

REPO = Path(__file__).parents[2]


def test_trimodal_train_and_evaluate(tmp_path, spoken_digits_root):
    root = spoken_digits_root
    shards = sorted((root / "train").glob("*.tar"))
    overrides = {
        "data.train": f"{root}/train/{{000000..{len(shards) - 1:06d}}}.tar", "data.batch_size": 32,
        "data.workers": 0, "data.shuffle_buffer": 200, "run.progress": False, "run.log_every": 1,
        "run.output_dir": tmp_path, "run.name": "tri", "run.steps": 40, "optim.warmup_steps": 5, "eval.datasets": f"[{root}]",
    }
    assert main(["train", str(REPO / "configs/spoken_digits.yaml"), *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    run_dir = tmp_path / "tri"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40 and {"image-text", "audio-text"} <= set(records[-1])
    assert "image-audio" not in records[-1]  # never paired in training
    for pair in ("image-text", "audio-text"):  # both pairs learn
        assert sum(r[pair] for r in records[-5:]) < sum(r[pair] for r in records[:5])

    result = json.loads((run_dir / "eval.json").read_text())[root.name]
    assert result["samples"] == 360 and result["skipped"] == 0 and result["retrieval_match"] == "class"
    for name in ["acc1", "acc5", "audio_acc1", "audio_mean_per_class_recall", "text_retrieval_recall@1",
                 "image_retrieval_recall@5", "audio_to_text_recall@1", "text_to_audio_recall@1",
                 "image_to_audio_recall@1", "audio_to_image_recall@10"]:
        assert 0.0 <= result[name] <= 1.0, name
    assert result["audio_to_image_recall@10"] >= result["audio_to_image_recall@1"]
