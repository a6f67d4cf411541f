"""Evaluation shared among processes: each embeds its share of the shards (or of a folder's files), and
the metrics equal one process's; only process 0 writes reports, and every collective is entered by all."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmcl import config as config_lib
from mmcl import dist
from mmcl.checkpoint import state as checkpoints
from mmcl.config import ProbeConfig
from mmcl.eval.suite import evaluate_all
from mmcl.models import load_model

from launch import TORCHRUN_2, launch

FIELDS = {"image": "png", "text": "txt"}
PROBE = ProbeConfig(mode="auto", split="probe", shots=8, val_fraction=0.25)  # few-shot where a probe/ split is


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, folder_root):
    """Three layouts in several pieces each: the digits in shards of 50 (test: 8 shards, probe: 29), the
    compositional retrieval set (3 captions per image) in shards of 20, and the held-out digits as a
    folder per class (read in runs of 256 files: 2 runs)."""
    from data_prep.digit_pairs import prepare_digit_pairs
    from data_prep.digits import prepare_digits

    base = tmp_path_factory.mktemp("split_eval")
    digits = base / "digits"
    prepare_digits(digits, captions_per_image=1, samples_per_shard=50, seed=0)
    pairs = base / "digit_pairs"
    prepare_digit_pairs(pairs, samples_per_shard=20)
    return [str(digits), str(pairs), str(folder_root)]


def assert_same_results(two, one):
    """Every dataset's metrics alike (floats to 1e-6: a sample's embedding may differ in the last bits
    with the batch it is embedded in), and everything else equal."""
    assert set(two) == set(one)
    for name, metrics in one.items():
        assert set(two[name]) == set(metrics)
        for key, value in metrics.items():
            if isinstance(value, float):
                assert two[name][key] == pytest.approx(value, abs=1e-6), (name, key)
            else:
                assert two[name][key] == value, (name, key)


def _evaluate(run_dir, datasets, out):
    checkpoint = checkpoints.latest(run_dir)
    cfg = config_lib.from_yaml((checkpoint / "config.yaml").read_text())
    model = load_model(cfg.model, checkpoints.load_weights(checkpoint), torch.device("cpu"))
    return evaluate_all(
        model, datasets, FIELDS, 64, [1, 5, 10], out, torch.device("cpu"), progress=False, quiet=True, probe=PROBE
    )


def _evaluate_in_group(rank, world, run_dir, datasets, out):
    dist.init_from_env(torch.device("cpu"))
    results = _evaluate(run_dir, datasets, out)
    assert (results is None) == (rank != 0)  # process 0 alone returns and writes the results
    dist.barrier()


def test_two_processes_give_the_metrics_of_one(digits_run, datasets, tmp_path):
    one = _evaluate(digits_run, datasets, tmp_path / "one.json")
    launch(_evaluate_in_group, 2, digits_run, datasets, tmp_path / "two.json")
    two = json.loads((tmp_path / "two.json").read_text())
    folders = datasets[2].rsplit("/", 1)[1]
    assert set(two) == set(one) == {"digits", "digit_pairs", folders}
    assert one["digits"]["samples"] == one[folders]["samples"] == 360 and one["digit_pairs"]["samples"] == 90
    assert one["digits"]["linear_probe"].startswith("fewshot k=8") and one[folders]["linear_probe"] == "halves"
    assert one["digits"]["acc1"] > 0.5
    assert_same_results(two, one)


def test_mmcl_eval_under_torchrun_shares_the_evaluation(digits_run, datasets, tmp_path):
    """`torchrun --nproc_per_node 2 -m mmcl eval`: the same results as one process, written once."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    command = ["-m", "mmcl", "eval", str(digits_run), "--datasets", *datasets[:2], "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *command, str(one)], check=True, env=env, timeout=600)
    subprocess.run([*TORCHRUN_2, *command, str(two)], check=True, env=env, timeout=600)
    assert_same_results(json.loads(two.read_text()), json.loads(one.read_text()))
