"""Per-source accounting: the samples drawn from each "::" source of data.train, summed over the
processes, in metrics.jsonl (and so TensorBoard) and in every checkpoint, and carried over a resume."""

import subprocess
import sys

from mmcl.checkpoint import state as checkpoints
from mmcl.train.metrics_log import read_records

from conftest import REPO, tiny_overrides
from launch import TORCHRUN_2


def train(digits_root, out, name, steps, *extra, launcher=(sys.executable, "-m", "mmcl")):
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000001}}.tar::{digits_root}/train/{{000002..000005}}.tar",
        **{"run.output_dir": out, "run.name": name, "run.steps": steps, "run.checkpoint_every": 4,
           "run.log_samples": True, "data.batch_size": 16},
    )  # fmt: skip
    subprocess.run([*launcher, "train", str(REPO / "configs/digits.yaml"), *overrides, *extra], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    return out / name


def test_samples_per_source_on_two_processes_match_the_keys_drawn(digits_root, tmp_path):
    # run.seed=1 orders the six shards so that process 0 starts in source 0 and process 1 in source 1
    run_dir = train(
        digits_root, tmp_path, "two", 8, "engine.backend=deepspeed", "run.seed=1", launcher=(*TORCHRUN_2, "-m", "mmcl")
    )
    first_source = {f"{digits_root}/train/{n:06d}.tar" for n in (0, 1)}
    drawn = {}  # step -> [source 0, source 1] over both processes' keys
    for rank in (0, 1):
        for record in read_records(run_dir / f"samples_rank{rank}.jsonl"):
            counts = drawn.setdefault(record["step"], [0, 0])
            for key in record["keys"]:
                counts[0 if key.split("#", 1)[0] in first_source else 1] += 1
    total = [0, 0]
    for record in read_records(run_dir / "metrics.jsonl"):
        total = [a + b for a, b in zip(total, drawn[record["step"]], strict=True)]
        assert [record["samples_source0"], record["samples_source1"]] == total, record["step"]
        assert sum(total) == record["samples_seen"]
    assert min(total) > 0  # both sources drawn from
    meta = checkpoints.read_meta(checkpoints.latest(run_dir))
    assert meta["samples_per_source"] == total


def test_samples_per_source_continue_over_a_resume(digits_root, tmp_path):
    whole = read_records(train(digits_root, tmp_path, "whole", 8) / "metrics.jsonl")
    train(digits_root, tmp_path, "resumed", 4)
    resumed = read_records(train(digits_root, tmp_path, "resumed", 8, "run.resume=latest") / "metrics.jsonl")
    assert [r["samples_source0"] for r in resumed] == [r["samples_source0"] for r in whole]
    assert [r["samples_source1"] for r in resumed] == [r["samples_source1"] for r in whole]
