"""Experiment trackers a run reports to besides metrics.jsonl (`run.log_to`): TensorBoard, Weights & Biases.

Each takes the step's scalars and the evaluation results; both are written by process 0 only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Mapping, Protocol

from torch.utils.tensorboard import SummaryWriter

from mmcl.config import RunConfig
from mmcl.errors import ConfigError


class Tracker(Protocol):
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def evaluation(self, results: Mapping[str, Mapping[str, Any]], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


def check_trackers(cfg: RunConfig, key: str = "run.log_to") -> None:
    """A ConfigError before any compute for a tracker whose package is missing."""
    if "wandb" in cfg.log_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"config key {key!r}: wandb is not installed (pip install mmcl[wandb], or pip install wandb)")


def eval_scalars(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, float]:
    """eval/<dataset>/<metric> -> value, for every float metric."""
    return {
        f"eval/{dataset}/{name}": value
        for dataset, metrics in results.items()
        for name, value in metrics.items()
        if isinstance(value, float)
    }


class TensorBoard:
    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        # purge_step: a resumed run drops the interrupted run's events past its checkpoint.
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resumed_step + 1)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def evaluation(self, results: Mapping[str, Mapping[str, Any]], step: int) -> None:
        self.scalars(eval_scalars(results), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WeightsAndBiases:
    """One W&B run per mmcl run: `run_id` (kept in every checkpoint) makes a resumed or requeued run append
    to it. WANDB_MODE=offline writes it under <run>/wandb/ for a later `wandb sync`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, config: Mapping[str, Any], run_id: str) -> None:
        # Imported here: wandb is an optional dependency (pip install mmcl[wandb]) that only runs logging
        # to W&B need, and it takes a second to import.
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=dict(config),
        )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def evaluation(self, results: Mapping[str, Mapping[str, Any]], step: int) -> None:
        rows = [
            [dataset, name, value]
            for dataset, metrics in results.items()
            for name, value in metrics.items()
            if isinstance(value, float)
        ]
        table = self.wandb.Table(columns=["dataset", "metric", "value"], data=rows)
        self.run.log({**eval_scalars(results), "eval/table": table}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # a run that crashed or halted shows as failed


def build_trackers(
    run_dir: Path, cfg: RunConfig, resumed_step: int, config: Mapping[str, Any], run_id: str
) -> List[Tracker]:
    trackers: List[Tracker] = []
    if "tensorboard" in cfg.log_to:
        trackers.append(TensorBoard(run_dir, resumed_step))
    if "wandb" in cfg.log_to:
        trackers.append(WeightsAndBiases(run_dir, cfg, config, run_id))
    return trackers
