"""Interrupted runs resume exactly: SIGKILL after a checkpoint, or SIGTERM mid-run, then run.resume=latest
continues with the uninterrupted run's losses (bitwise on one CPU process) and its very samples."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcl.checkpoint import state as checkpoints
from mmcl.train.metrics_log import read_records

from conftest import REPO, tiny_overrides
from launch import TORCHRUN_2

STEPS = 14


def command(digits_root, out, name, *extra, launcher=(sys.executable, "-m", "mmcl")):
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": out,
            "run.name": name,
            "run.steps": STEPS,
            "run.checkpoint_every": 4,
            "run.log_samples": True,
            "optim.warmup_steps": 3,
            "data.batch_size": 24,
        },
    )
    return [*launcher, "train", str(REPO / "configs/digits.yaml"), *overrides, *extra]


def records(run_dir, file="metrics.jsonl"):
    return read_records(run_dir / file)


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root):
    out = tmp_path_factory.mktemp("runs")
    for workers in (0, 1):
        subprocess.run(
            command(digits_root, out, f"whole{workers}", f"data.workers={workers}"),
            check=True,
            capture_output=True,
            timeout=600,
        )
    return out


def assert_same_run(resumed, whole, exact=True):
    got, want = records(resumed), records(whole)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=False):
        if exact:
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
        else:
            assert abs(a["loss"] - b["loss"]) <= 1e-6, a["step"]
    files = sorted(p.name for p in whole.glob("samples_rank*.jsonl"))
    for file in files:  # the same samples, each step, on every process: none skipped, none repeated
        assert records(resumed, file) == records(whole, file)


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_after_a_checkpoint(tmp_path, digits_root, uninterrupted, workers):
    process = subprocess.Popen(
        command(digits_root, tmp_path, "run", f"data.workers={workers}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (checkpoints.latest(tmp_path / "run") or Path("step_0")).name >= "step_00000008", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints.latest(tmp_path / "run").name in ("step_00000008", "step_00000012")
    subprocess.run(
        command(digits_root, tmp_path, "run", f"data.workers={workers}", "run.resume=latest"),
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert_same_run(tmp_path / "run", uninterrupted / f"whole{workers}")


def test_sigterm_checkpoints_mid_run_and_stops(tmp_path, digits_root, uninterrupted):
    process = subprocess.Popen(
        command(digits_root, tmp_path, "run", "data.workers=1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr  # "stopped, resumable": what batch scripts requeue on
    stopped_at = checkpoints.read_meta(checkpoints.latest(tmp_path / "run"))["step"]
    assert 5 <= stopped_at < STEPS and stopped_at % 4 != 0  # a checkpoint of its own, off the schedule
    assert "resume with run.resume=latest" in stderr
    subprocess.run(
        command(digits_root, tmp_path, "run", "data.workers=1", "run.resume=latest"),
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert_same_run(tmp_path / "run", uninterrupted / "whole1")


def test_two_process_zero2_resume_after_sigkill(tmp_path, digits_root):
    torchrun = (*TORCHRUN_2, "-m", "mmcl")
    extra = ("engine.backend=deepspeed", "engine.zero_stage=2")
    subprocess.run(
        command(digits_root, tmp_path, "whole", *extra, launcher=torchrun), check=True, capture_output=True, timeout=600
    )
    process = subprocess.Popen(
        command(digits_root, tmp_path, "run", *extra, launcher=torchrun),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: (checkpoints.latest(tmp_path / "run") or Path("step_0")).name >= "step_00000004", process)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
    process.wait()
    subprocess.run(
        command(digits_root, tmp_path, "run", *extra, "run.resume=latest", launcher=torchrun),
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert_same_run(tmp_path / "run", tmp_path / "whole", exact=False)
