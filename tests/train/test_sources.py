"""Per-source accounting: the samples drawn from each source ("::" part of data.train, or item of
data.sources), summed over the processes, in metrics.jsonl (and so TensorBoard) and in every checkpoint,
and carried over a resume; weighted and resampled sources resume exactly on 1 and 2 processes."""

import subprocess
import sys

import pytest

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


def weighted(digits_root, resampled):
    """data.sources: shards 0-1 at weight 1 against shards 2-5 at weight 3, epochs of 96 samples (6 steps)."""
    urls = [f"{digits_root}/train/{{000000..000001}}.tar", f"{digits_root}/train/{{000002..000005}}.tar"]
    sources = f"data.sources=[{{urls: '{urls[0]}', weight: 1}}, {{urls: '{urls[1]}', weight: 3}}]"
    return ("data.train=''", sources, f"data.resampled={resampled}", "data.epoch_samples=96",
            "optim.schedule=constant", "optim.warmup_steps=2")  # fmt: skip


def assert_same_samples(resumed, whole, exact):
    got, want = read_records(resumed / "metrics.jsonl"), read_records(whole / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 11))
    for a, b in zip(got, want, strict=True):
        assert (a["loss"] == b["loss"]) if exact else abs(a["loss"] - b["loss"]) <= 1e-6, a["step"]
        assert (a["samples_source0"], a["samples_source1"]) == (b["samples_source0"], b["samples_source1"])
    files = sorted(p.name for p in whole.glob("samples_rank*.jsonl"))
    assert files and all(read_records(resumed / f) == read_records(whole / f) for f in files)
    last = want[-1]
    assert last["samples_source1"] > 2 * last["samples_source0"] > 0  # drawn by weight, 1:3


@pytest.mark.parametrize("resampled", [False, True])
def test_weighted_sources_resume_bitwise_on_one_process(digits_root, tmp_path, resampled):
    extra = weighted(digits_root, resampled)
    whole = train(digits_root, tmp_path, "whole", 10, *extra)
    train(digits_root, tmp_path, "resumed", 5, *extra)  # stops mid-epoch: 5 of the epoch's 6 steps
    resumed = train(digits_root, tmp_path, "resumed", 10, *extra, "run.resume=latest")
    assert_same_samples(resumed, whole, exact=True)


def test_resampled_weighted_sources_resume_with_the_same_samples_on_two_processes(digits_root, tmp_path):
    extra = (*weighted(digits_root, True), "data.workers=1", "engine.backend=deepspeed")
    torchrun = (*TORCHRUN_2, "-m", "mmcl")
    whole = train(digits_root, tmp_path, "whole", 10, *extra, launcher=torchrun)
    train(digits_root, tmp_path, "resumed", 4, *extra, launcher=torchrun)  # an epoch is 3 steps on 2 processes
    resumed = train(digits_root, tmp_path, "resumed", 10, *extra, "run.resume=latest", launcher=torchrun)
    assert_same_samples(resumed, whole, exact=False)
