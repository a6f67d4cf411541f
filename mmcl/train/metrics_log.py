"""Where a run's progress goes: the progress bar, metrics.jsonl, the trackers (TensorBoard, W&B) and a
loss-curve plot at the end (process 0), and each process's sample keys when run.log_samples is set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, TextIO, Type

from tqdm import tqdm

from mmcl import dist
from mmcl.config import RunConfig
from mmcl.data import Batch
from mmcl.plotting import pyplot
from mmcl.train.run_state import RunState
from mmcl.train.trackers import Tracker, build_trackers
from mmcl.train.validation import VAL_LOSS

METRICS_FILE = "metrics.jsonl"
EVAL_HISTORY_FILE = "eval_history.jsonl"


def read_records(path: Path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the JSONL records of steps up to `last_step` (none for a fresh run): after a resume, the
    records past the checkpoint belong to the interrupted future."""
    if not path.exists():
        return
    kept = [record for record in read_records(path) if record["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


class MetricsLog:
    """metrics.jsonl and eval_history.jsonl, and the trackers run.log_to names (process 0)."""

    def __init__(self, run_dir: Path, trackers: List[Tracker], resumed_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        truncate_log(self.path, resumed_step)
        truncate_log(self.run_dir / EVAL_HISTORY_FILE, resumed_step)
        self.file = open(self.path, "a")
        self.trackers = trackers

    def write(self, record: Dict[str, float]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {name: value for name, value in record.items() if name != "step" and isinstance(value, (int, float))}
        for tracker in self.trackers:
            tracker.scalars(scalars, int(record["step"]))

    def write_eval(self, step: int, results: Dict[str, Dict[str, Any]], during_training: bool) -> None:
        """An evaluation's results to every tracker (eval/<dataset>/<metric>); those made during training
        also to eval_history.jsonl."""
        if during_training:
            with open(self.run_dir / EVAL_HISTORY_FILE, "a") as history:
                history.write(json.dumps({"step": step, "results": results}) + "\n")
        for tracker in self.trackers:
            tracker.evaluation(results, step)

    def close(self, failed: bool = False) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close(failed)
        plot_curves(self.path, self.run_dir / "loss.png")


class TrainingLog:
    """A context manager over one training session: `record` after every step, `record_eval` after a
    mid-training evaluation; everything is flushed and closed (and the plot drawn) on exit."""

    def __init__(self, run_dir: Path, cfg: RunConfig, start: RunState, main: bool, config: Mapping[str, Any]) -> None:
        # The rate counts this session's samples only.
        self.cfg, self.started_at, self.seen_at_start = cfg, time.perf_counter(), start.samples_seen
        self.progress = tqdm(
            total=cfg.steps, initial=start.step, desc="train", dynamic_ncols=True, disable=not (cfg.progress and main)
        )
        self.metrics = None
        if main:
            trackers = build_trackers(run_dir, cfg, start.step, config, start.run_id)
            self.metrics = MetricsLog(run_dir, trackers, start.step)
        samples_path = Path(run_dir) / f"samples_rank{dist.rank()}.jsonl"
        self.samples: Optional[TextIO] = None
        if cfg.log_samples:
            truncate_log(samples_path, start.step)
            self.samples = open(samples_path, "a")

    def record(self, state: RunState, batch: Batch, metrics: Mapping[str, float], epoch: int) -> None:
        self.progress.update(1)
        if self.samples:
            self.samples.write(json.dumps({"step": state.step, "keys": batch.keys}) + "\n")
            self.samples.flush()
        logged = state.step % self.cfg.log_every == 0 or state.step == self.cfg.steps or VAL_LOSS in metrics
        if self.metrics and logged:  # a step with a validation loss is always logged, to keep it
            rate = (state.samples_seen - self.seen_at_start) / max(time.perf_counter() - self.started_at, 1e-9)
            self.metrics.write(
                {
                    "step": state.step,
                    "samples_seen": state.samples_seen,
                    "samples_skipped": state.samples_skipped,
                    "epoch": epoch,
                    "samples_per_s": rate,
                    "samples_per_s_per_device": rate / dist.world_size(),
                    **metrics,
                }
            )
            self.progress.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                lr=f"{metrics['lr']:.1e}",
                samples_s=f"{rate:.0f}",
                skipped=state.samples_skipped,
            )

    def steps_done(self) -> None:
        self.progress.close()

    def record_eval(self, step: int, results: Optional[Dict[str, Dict[str, Any]]], during_training: bool) -> None:
        if self.metrics and results:
            self.metrics.write_eval(step, results, during_training)

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        self.progress.close()
        if self.metrics:
            self.metrics.close(failed=error is not None)
        if self.samples:
            self.samples.close()


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Loss (and each loss part), learning rate and logit scale against the step, as one PNG."""
    plt = pyplot()

    records = read_records(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    parts = [k for k in records[-1] if k == "loss" or "-" in k]  # "loss" and pair parts like "image-text"
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in parts:
        axes[0].plot(steps, [r.get(name) for r in records], label=name)
    validated = [r for r in records if VAL_LOSS in r]
    if validated:
        axes[0].plot([r["step"] for r in validated], [r[VAL_LOSS] for r in validated], "o-", label=VAL_LOSS)
    axes[0].set_title("loss")
    axes[0].legend(fontsize=8)
    for axis, name in zip(axes[1:], ("lr", "logit_scale"), strict=True):
        axis.plot(steps, [r.get(name) for r in records])
        axis.set_title(name)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
