"""A tiny real run: digits shards -> train -> checkpoint -> resume -> zero-shot evaluation, via the CLI."""

import json
import shutil
import subprocess
import sys
import tarfile

from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.cli import main
from mmcl.train.metrics_log import read_records

from conftest import REPO, digits_run_overrides


def test_train_resume_and_evaluate(tmp_path, digits_root, digits_run):
    """digits_run trained through `mmcl train` (300 steps, checkpoints at 200 and 300, keep_last 1)."""
    records = read_records(digits_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 301))
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert all(r["samples_skipped"] == 0 for r in records)

    assert checkpoints.latest(digits_run).name == "step_00000300"
    assert [p.name for p in (digits_run / "checkpoints").glob("step_*")] == ["step_00000300"]  # keep_last=1
    saved = digits_run / "checkpoints" / "step_00000300"
    assert config_lib.from_yaml((saved / "config.yaml").read_text()).run.steps == 300  # the config travels with it
    assert (digits_run / "config.yaml").read_text() == (saved / "config.yaml").read_text()
    assert checkpoints.read_meta(saved)["samples_seen"] == 300 * 32

    assert (digits_run / "loss.png").stat().st_size > 0  # the loss-curve plot
    assert any((digits_run / "tensorboard").glob("events.out.tfevents.*"))

    results = json.loads((digits_run / "eval.json").read_text())["digits"]
    assert results["samples"] == 360 and results["classes"] == 10
    assert 0.5 < results["acc1"] <= results["acc5"]  # chance is 0.1

    # On a copy: a fresh run must not overwrite a run that has checkpoints; a resumed one continues it.
    run_dir = tmp_path / "tiny"
    shutil.copytree(digits_run, run_dir)
    overrides = digits_run_overrides(digits_root, tmp_path)
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 2

    # Resume: the run continues from step 300 to 310 and appends to the same metrics.
    more = [o for o in overrides if not o.startswith("run.steps")] + ["run.steps=310", "run.resume=latest"]
    assert main(["train", str(REPO / "configs/digits.yaml"), *more]) == 0
    assert [r["step"] for r in read_records(run_dir / "metrics.jsonl")] == list(range(1, 311))
    assert checkpoints.latest(run_dir).name == "step_00000310"

    # Evaluating the run directory afterwards gives the model's scores again.
    out = tmp_path / "again.json"
    assert main(["eval", str(run_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["digits"]["samples"] == 360


def test_prep_command_writes_train_and_held_out_splits(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmcl",
            "prep",
            "digits",
            "--out",
            str(tmp_path),
            "--captions-per-image",
            "1",
            "--samples-per-shard",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    sizes = json.loads((tmp_path / "train" / "sizes.json").read_text())
    test_sizes = json.loads((tmp_path / "test" / "sizes.json").read_text())
    assert sum(sizes.values()) + sum(test_sizes.values()) == 1797  # every digit, in exactly one split

    def image_ids(shard):
        with tarfile.open(tmp_path / shard) as tar:
            return {name.split(".")[0].split("_")[0] for name in tar.getnames()}

    assert not image_ids("train/000000.tar") & image_ids("test/0.tar")  # held-out images are never trained on
    assert image_ids("probe/0.tar") == image_ids("train/000000.tar")  # the labelled split: the training images
    assert (tmp_path / "classnames.txt").read_text().split() == [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    ]
