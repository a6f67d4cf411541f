"""Comparing models: the comparison files from hand-made results, and `mmcl eval` over a trained run and
the same weights exported as an open_clip file."""

import csv
import json
import shutil

import open_clip
import pytest
from PIL import Image

from mmcl import config as config_lib
from mmcl.checkpoint import convert
from mmcl.checkpoint import state as checkpoints
from mmcl.cli import main
from mmcl.eval.compare import model_names, write_comparison

RESULTS = {
    "run-a": {
        "digits": {"dataset": "digits", "samples": 360, "classes": 10, "acc1": 0.9123456789, "acc5": 1.0},
        "drawings/v2": {"samples": 50, "image_retrieval_recall@1": 0.25, "skipped": 0},
    },
    "ViT-B-32": {
        "digits": {"dataset": "digits", "samples": 360, "classes": 10, "acc1": 0.95, "acc5": 1.0, "audio_acc1": 0.5},
        "drawings/v2": {"samples": 50, "image_retrieval_recall@1": 0.125, "skipped": 0},
    },
}


def test_the_csv_reads_back_every_metric_and_nothing_else(tmp_path):
    written = write_comparison(RESULTS, tmp_path)
    with (tmp_path / "comparison.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert written["comparison.csv"] == tmp_path / "comparison.csv"
    assert list(rows[0]) == ["model", "dataset", "metric", "value"]
    back = {(r["model"], r["dataset"], r["metric"]): float(r["value"]) for r in rows}
    expected = {
        (model, dataset, metric): value
        for model, by_dataset in RESULTS.items()
        for dataset, values in by_dataset.items()
        for metric, value in values.items()
        if isinstance(value, float)
    }
    assert back == expected and len(rows) == len(expected) == 7  # exactly: full precision, no info keys
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_markdown_has_a_table_per_dataset_with_the_best_model_in_bold(tmp_path):
    write_comparison(RESULTS, tmp_path)
    markdown = (tmp_path / "comparison.md").read_text()
    lines = markdown.splitlines()
    assert "### digits (360 samples)" in lines and "### drawings/v2 (50 samples)" in lines
    assert lines.count("| metric (%) | run-a | ViT-B-32 |") == 2
    assert "| acc1 | 91.2 | **95.0** |" in lines
    assert "| acc5 | **100.0** | **100.0** |" in lines  # a tie: both are best
    assert "| audio_acc1 | - | **50.0** |" in lines  # run-a has no audio tower
    assert "| image_retrieval_recall@1 | **25.0** | 12.5 |" in lines
    assert "samples |" not in markdown and "classes" not in markdown and "skipped" not in markdown


def test_one_bar_chart_per_dataset_and_metric(tmp_path):
    written = write_comparison(RESULTS, tmp_path)
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert charts == [
        "digits-acc1.png",
        "digits-acc5.png",
        "digits-audio_acc1.png",
        "drawings_v2-image_retrieval_recall@1.png",  # "/" would name a folder; "@" is kept
    ]
    assert sorted(k for k in written if k.startswith("charts/")) == [f"charts/{name}" for name in charts]
    for name in charts:
        with Image.open(tmp_path / "charts" / name) as image:
            image.verify()  # a complete, valid PNG
            assert image.format == "PNG" and image.size[0] >= 300


def test_models_sharing_a_name_take_their_path_stem(tmp_path):
    names = model_names(["tiny", "ViT-B-32", "tiny", "tiny"], [tmp_path / "a", "m.pt", tmp_path / "b", "c/a"])
    assert names == ["tiny-a", "ViT-B-32", "tiny-b", "tiny-a-2"]


@pytest.fixture
def open_clip_export(digits_run, tmp_path):
    """digits_run's latest weights as an open_clip checkpoint file of architecture "digits-tiny"."""
    latest = checkpoints.latest(digits_run)
    cfg = config_lib.from_yaml((latest / "config.yaml").read_text())
    config_path, weights = convert.export_open_clip(
        checkpoints.load_weights(latest), cfg, tmp_path / "export", "digits-tiny"
    )
    open_clip.add_model_config(config_path)
    return weights


def test_eval_compares_a_run_with_its_open_clip_export(digits_root, digits_run, open_clip_export, tmp_path, capsys):
    """The same weights through both loaders: both columns agree, and the model separates the digits."""
    out = tmp_path / "comparison"
    argv = ["eval", str(digits_run), f"digits-tiny={open_clip_export}", "--datasets", str(digits_root)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    with (out / "comparison.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"tiny", "digits-tiny"}
    acc1 = {r["model"]: float(r["value"]) for r in rows if r["metric"] == "acc1"}
    assert acc1["tiny"] == pytest.approx(acc1["digits-tiny"], abs=1e-6)
    assert acc1["tiny"] > 0.5  # chance: 0.1
    for model in ("tiny", "digits-tiny"):  # each model's usual reports, under its name
        assert json.loads((out / model / "eval.json").read_text())[digits_root.name]["acc1"] == acc1[model]
        assert json.loads((out / model / "eval" / f"{digits_root.name}.json").read_text())["model"] == model
    assert (out / "charts" / f"{digits_root.name}-acc1.png").is_file()
    printed = capsys.readouterr().out
    assert (out / "comparison.md").read_text() in printed and "| metric (%) | tiny | digits-tiny |" in printed


def test_a_missing_open_clip_file_stops_before_any_evaluation(digits_root, digits_run, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.pt"
    out = tmp_path / "comparison"
    argv = ["eval", str(digits_run), f"ViT-B-32={missing}", "--datasets", str(digits_root), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("mmcl eval: error:") and str(missing) in errors[0]
    assert not out.exists()  # the run, named first, was not evaluated


def test_runs_naming_different_datasets_need_the_option(digits_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(checkpoints.latest(digits_run), other)
    cfg = config_lib.from_yaml((other / "config.yaml").read_text())
    cfg.eval.datasets = ["elsewhere/set"]
    (other / "config.yaml").write_text(config_lib.to_yaml(cfg))
    assert main(["eval", str(digits_run), str(other), "--out", str(tmp_path / "comparison")]) == 2
    error = capsys.readouterr().err
    assert "different eval.datasets" in error and "--datasets" in error
    assert not (tmp_path / "comparison").exists()
