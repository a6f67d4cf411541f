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
from mmcl.errors import DataError
from mmcl.eval.datasets import load_dataset
from mmcl.eval.embed import embed_split
from mmcl.eval.suite import evaluate_all
from mmcl.eval.zeroshot import eval_inputs
from mmcl.models import load_model

from launch import TORCHRUN_2, launch

FIELDS = {"image": "png", "text": "txt"}
PROBE = ProbeConfig(mode="auto", split="probe", shots=8, val_fraction=0.25)  # few-shot where a probe/ split is


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, folder_root, digits_root):
    """Three layouts in several pieces each: the digits in shards of 50 (test: 8 shards, probe: 29), the
    compositional retrieval set (3 captions per image) in shards of 20, and the held-out digits as a
    folder per class (read in runs of 256 files: 2 runs); and the digits in one test shard, which leaves
    the second process none."""
    from data_prep.digit_pairs import prepare_digit_pairs
    from data_prep.digits import prepare_digits

    base = tmp_path_factory.mktemp("split_eval")
    digits = base / "digits_in_50s"
    prepare_digits(digits, captions_per_image=1, samples_per_shard=50, seed=0)
    pairs = base / "digit_pairs"
    prepare_digit_pairs(pairs, samples_per_shard=20)
    return [str(digits), str(pairs), str(folder_root), str(digits_root)]


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
    assert set(one) == {"digits_in_50s", "digit_pairs", folders, "digits"}
    assert one["digits_in_50s"]["samples"] == one[folders]["samples"] == one["digits"]["samples"] == 360
    assert one["digit_pairs"]["samples"] == 90
    assert one["digits_in_50s"]["linear_probe"].startswith("fewshot k=8") and one[folders]["linear_probe"] == "halves"
    assert one["digits_in_50s"]["acc1"] > 0.5
    assert_same_results(two, one)


def test_mmcl_eval_under_torchrun_shares_the_evaluation(digits_run, datasets, tmp_path):
    """`torchrun --nproc_per_node 2 -m mmcl eval`: the same results as one process, written once."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    command = ["-m", "mmcl", "eval", str(digits_run), "--datasets", *datasets[:2], "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *command, str(one)], check=True, env=env, timeout=600)
    subprocess.run([*TORCHRUN_2, *command, str(two)], check=True, env=env, timeout=600)
    assert_same_results(json.loads(two.read_text()), json.loads(one.read_text()))


def _embed_in_group(rank, world, run_dir, roots, out):
    dist.init_from_env(torch.device("cpu"))
    embedded = [_embedded(run_dir, root) for root in roots]
    if rank == 0:
        torch.save([(e.emb, e.counts, e.labels, e.skipped) for e in embedded], out)


def _embedded(run_dir, root):
    checkpoint = checkpoints.latest(run_dir)
    cfg = config_lib.from_yaml((checkpoint / "config.yaml").read_text())
    model = load_model(cfg.model, checkpoints.load_weights(checkpoint), torch.device("cpu"))
    dataset = load_dataset(root)
    inputs = eval_inputs(model, dataset, FIELDS, labelled=True)
    return embed_split(model, dataset.shards, dataset.folder_samples, inputs, 64, torch.device("cpu"), progress=False)


def test_two_processes_embed_every_sample_in_one_process_order(digits_run, datasets, tmp_path):
    """The gathered embeddings themselves, row by row, for the sharded set, the folder set and the
    one-shard set: each sample's image row, its caption rows, its label, in one process's order."""
    roots = [datasets[0], datasets[2], datasets[3]]
    launch(_embed_in_group, 2, digits_run, roots, tmp_path / "two.pt")
    for root, (emb, counts, labels, skipped) in zip(roots, torch.load(tmp_path / "two.pt"), strict=True):
        one = _embedded(digits_run, root)
        assert torch.equal(labels, one.labels) and skipped == one.skipped == 0, root
        for modality in one.emb:
            assert torch.equal(counts[modality], one.counts[modality]), (root, modality)
            torch.testing.assert_close(emb[modality], one.emb[modality], rtol=0, atol=1e-5)


def _fail_on_process_zero(rank, world, run_dir, root, errors):
    dist.init_from_env(torch.device("cpu"))
    checkpoint = checkpoints.latest(run_dir)
    cfg = config_lib.from_yaml((checkpoint / "config.yaml").read_text())
    model = load_model(cfg.model, checkpoints.load_weights(checkpoint), torch.device("cpu"))
    too_many_shots = ProbeConfig(mode="fewshot", split="probe", shots=500)  # no digit has 500 training images
    try:
        evaluate_all(model, [root], FIELDS, 64, [1], errors / "eval.json", torch.device("cpu"), progress=False,
                     quiet=True, probe=too_many_shots)  # fmt: skip
    except DataError as error:
        (errors / f"rank{rank}.txt").write_text(str(error))


def test_an_error_on_process_zero_stops_every_process(digits_run, datasets, tmp_path):
    """Process 0 alone computes the metrics; when that fails, the others stop with an error too instead
    of waiting for it in a collective."""
    launch(_fail_on_process_zero, 2, digits_run, datasets[0], tmp_path)
    assert "fewer than 500 shots" in (tmp_path / "rank0.txt").read_text()
    assert "failed on process 0" in (tmp_path / "rank1.txt").read_text()
