"""Weights & Biases beside TensorBoard, offline (no network here): a run stopped by SIGTERM and resumed
appends to the same W&B run, whose id travels in the checkpoint; config, metrics and evaluation tables
are logged."""

import json
import os
import signal
import subprocess
import sys
import time

from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.train.metrics_log import read_records
from mmcl.train.trainer import Trainer

from conftest import REPO, tiny_overrides


def command(digits_root, out, *extra):
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": out,
            "run.name": "tracked",
            "run.steps": 12,
            "run.checkpoint_every": 4,
            "run.log_to": "[tensorboard,wandb]",
            "data.batch_size": 16,
            "data.workers": 1,
            "optim.warmup_steps": 2,
            "eval.datasets": f"[{digits_root}]",
        },
    )
    return [sys.executable, "-m", "mmcl", "train", str(REPO / "configs/digits.yaml"), *overrides, *extra]


def test_a_resumed_run_appends_to_the_same_wandb_run(tmp_path, digits_root):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_dir = tmp_path / "tracked"
    process = subprocess.Popen(
        command(digits_root, tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 3  # stopped after checkpointing
    run_id = checkpoints.read_meta(checkpoints.latest(run_dir))["run_id"]
    subprocess.run(
        command(digits_root, tmp_path, "run.resume=latest"), env=env, check=True, capture_output=True, timeout=600
    )

    assert [r["step"] for r in read_records(metrics)] == list(range(1, 13))
    assert checkpoints.read_meta(checkpoints.latest(run_dir))["run_id"] == run_id
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions)  # one run, two sessions
    for session in sessions:
        logged = (session / f"run-{run_id}.wandb").read_bytes()
        assert b"image-text" in logged or b"loss" in logged  # the step metrics
        assert b"mmcl-tiny" in logged  # the run's config (its towers' preset)
    tables = list((sessions[-1] / "files" / "media" / "table" / "eval").glob("*.table.json"))
    table = json.loads(tables[0].read_text())
    results = json.loads((run_dir / "eval.json").read_text())["digits"]
    assert ["digits", "acc1", results["acc1"]] in table["data"]  # the final evaluation, as a table


def test_a_run_started_from_another_runs_checkpoint_gets_its_own_tracker_run(tmp_path, digits_root):
    def trainer(name, *resume):
        overrides = tiny_overrides(
            f"{digits_root}/train/{{000000..000005}}.tar",
            **{"run.output_dir": tmp_path, "run.name": name, "run.steps": 2, "run.log_to": "[]"},
        )
        return Trainer(config_lib.load(None, [*overrides, *resume]))

    first = trainer("first")
    first.train()
    checkpoint = checkpoints.latest(tmp_path / "first")
    run_id = checkpoints.read_meta(checkpoint)["run_id"]
    assert trainer("first", "run.resume=latest").state.run_id == run_id  # the same run, resumed: the same W&B run
    other = trainer("second", f"run.resume={checkpoint}")
    assert other.state.step == 2 and other.state.run_id != run_id  # another run: a W&B run of its own
