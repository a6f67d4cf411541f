"""The slurm/ batch scripts on a real local SLURM cluster (2 node daemons): a 2-node ZeRO training job
with a dependent evaluation job, and a job that gets the warning signal, checkpoints, requeues itself
and resumes from its checkpoint."""

import json
import subprocess
import sys

import pytest

from mmcl.checkpoint import state as checkpoints
from mmcl.train.metrics_log import read_records

from cluster import Cluster, ensure_installed
from conftest import REPO, tiny_overrides
from launch import TORCHRUN_2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_installed()
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def job_env():
    # The jobs run this interpreter; the batch scripts find slurm/ by path (SLURM copies batch
    # scripts to its spool directory).
    return {"MMCL_PYTHON": sys.executable, "MMCL_SLURM_DIR": str(REPO / "slurm")}


def overrides(digits_root, name, steps, **extra):
    items = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.name": name,
            "run.steps": steps,
            "run.checkpoint_every": 1000,
            "run.log_samples": True,
            "data.batch_size": 16,
            "engine.zero_stage": 2,
            **extra,
        },
    )
    return [item for item in items if not item.startswith("run.output_dir")]


def test_two_node_training_then_dependent_evaluation_and_export(cluster, digits_root, tmp_path):
    submitted = cluster.run(
        str(REPO / "slurm" / "submit.sh"),
        "cpu",
        "twonode",
        str(REPO / "configs/digits.yaml"),
        *overrides(digits_root, "twonode", 6),
        f"eval.datasets=[{digits_root}]",
        cwd=tmp_path,
        extra_env=job_env(),
    )
    train_job, eval_job, export_job = [word for word in submitted.replace(",", "").split() if word.isdigit()]
    info = cluster.wait_for_state(train_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = (tmp_path / "logs" / f"mmcl-train-cpu-{train_job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["NodeList"] == "node[1-2]" and "2 tasks on node[1-2], rendezvous 127.0.0.1" in log

    run_dir = tmp_path / "runs" / "twonode"
    assert [r["step"] for r in read_records(run_dir / "metrics.jsonl")] == list(range(1, 7))
    assert checkpoints.read_meta(checkpoints.latest(run_dir))["world_size"] == 2
    keys = [read_records(run_dir / f"samples_rank{r}.jsonl") for r in (0, 1)]
    assert not {k for s in keys[0] for k in s["keys"]} & {k for s in keys[1] for k in s["keys"]}  # disjoint shards

    info = cluster.wait_for_state(eval_job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    assert info["JobState"] == "COMPLETED", (tmp_path / "logs" / f"mmcl-eval-{eval_job}.out").read_text()
    result = json.loads((checkpoints.latest(run_dir) / "eval.json").read_text())
    assert result["digits"]["samples"] == 360

    info = cluster.wait_for_state(export_job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    assert info["JobState"] == "COMPLETED", (tmp_path / "logs" / f"mmcl-convert-{export_job}.out").read_text()
    assert (tmp_path / "exports" / "twonode" / "twonode.safetensors").exists()

    # srun's two tasks train as torchrun's two processes do: the same losses.
    torchrun = [*TORCHRUN_2, "-m", "mmcl"]
    subprocess.run(
        [
            *torchrun,
            "train",
            str(REPO / "configs/digits.yaml"),
            *overrides(digits_root, "twonode", 6),
            f"run.output_dir={tmp_path / 'torchrun'}",
            "engine.backend=deepspeed",
            "engine.device=cpu",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    losses = [r["loss"] for r in read_records(run_dir / "metrics.jsonl")]
    reference = [r["loss"] for r in read_records(tmp_path / "torchrun" / "twonode" / "metrics.jsonl")]
    assert losses == pytest.approx(reference, abs=1e-5)


def test_warning_signal_checkpoints_requeues_and_resumes(cluster, digits_root, tmp_path):
    (tmp_path / "logs").mkdir()
    steps = 60
    job = cluster.run(
        "sbatch",
        "--parsable",
        str(REPO / "slurm" / "train_cpu.sbatch"),
        str(REPO / "configs/digits.yaml"),
        *overrides(digits_root, "preempted", steps),
        cwd=tmp_path,
        extra_env=job_env(),
    )
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    cluster.wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 300, "step 5")
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 sends before the time limit

    log_path = tmp_path / "logs" / f"mmcl-train-cpu-{job}.out"
    cluster.wait(lambda: "restart 1" in log_path.read_text(), 300, "the requeued job to start")
    info = cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "requeueing job" in log

    run_dir = tmp_path / "runs" / "preempted"
    assert [r["step"] for r in read_records(metrics)] == list(range(1, steps + 1))  # nothing lost, nothing twice
    stopped_at = [line for line in log.splitlines() if "resumed from" in line]
    assert stopped_at, log
    for rank in (0, 1):  # within each epoch, every sample once
        seen = [(r["step"], k) for r in read_records(run_dir / f"samples_rank{rank}.jsonl") for k in r["keys"]]
        assert [s for s, _ in seen] == sorted(s for s, _ in seen)
        assert len({k for _, k in seen}) == len(seen)
    assert checkpoints.read_meta(checkpoints.latest(run_dir))["step"] == steps
