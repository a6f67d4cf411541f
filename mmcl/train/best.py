"""Keeping the best checkpoint: which metric (run.keep_best), which way is better, and whether a step's
value beats the best so far (kept in the run state, so it survives a resume).

The metric is val_loss (the validation loss, every eval.val_every steps) or an evaluation's
"<dataset>/<metric>" as eval.json names them. Evaluation results exist on process 0 only: their value
is sent to every process, so all decide alike and the checkpoint they then write together is the same.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from mmcl import dist
from mmcl.checkpoint import state as checkpoints
from mmcl.config import Config
from mmcl.errors import ConfigError
from mmcl.train.run_state import RunState
from mmcl.train.validation import VAL_LOSS

Results = Optional[Dict[str, Dict[str, Any]]]


def check_keep_best(cfg: Config) -> None:
    """A ConfigError naming run.keep_best when no evaluation of this run can produce its metric."""
    metric = cfg.run.keep_best
    if not metric:
        return
    if metric == VAL_LOSS:
        if not (cfg.data.val and cfg.eval.val_every):
            raise ConfigError("config key 'run.keep_best': val_loss needs data.val and eval.val_every")
        return
    dataset, _, name = metric.partition("/")
    datasets = [Path(root).name for root in cfg.eval.datasets]
    if not name or dataset not in datasets:
        raise ConfigError(
            f"config key 'run.keep_best': {metric!r} is neither val_loss nor '<dataset>/<metric>' of a dataset "
            f"of eval.datasets ({', '.join(datasets) or 'none'})"
        )


def lower_is_better(metric: str, mode: str) -> bool:
    """run.keep_best_mode: min, max, or auto (min for a name ending in "loss")."""
    return mode == "min" or (mode == "auto" and metric.endswith("loss"))


class KeepBest:
    """`observe` after each step (collective when evaluated): True when the step's value is a new best,
    recorded in the run state; the caller then checkpoints the step and points `best` at it."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric = metric
        self.lower = lower_is_better(metric, mode)

    def observe(self, state: RunState, metrics: Mapping[str, float], results: Results, evaluated: bool) -> bool:
        """`results`: the evaluation's (process 0's; None elsewhere) when `evaluated` this step."""
        value = self.value(metrics, results, evaluated)
        if value is None or not math.isfinite(value):
            return False
        if state.best_value is not None and not (value < state.best_value if self.lower else value > state.best_value):
            return False
        state.best_value, state.best_step = value, state.step
        return True

    def restore(self, state: RunState, run_dir: Path) -> None:
        """On resume (process 0): a crash after a best checkpoint was published but before `best` was
        pointed at it leaves the run state naming it; point `best` there, or pruning would take it."""
        named = checkpoints.checkpoint_root(run_dir) / f"step_{state.best_step:08d}"
        if (
            self.metric
            and state.best_value is not None
            and dist.rank() == 0
            and (named / checkpoints.META_FILE).exists()
        ):
            if checkpoints.best(run_dir) != named:
                checkpoints.point_best(run_dir, named)

    def observe_final(self, state: RunState, results: Results, run_dir: Path) -> None:
        """After the final evaluation, past the last step's checkpoint (collective): when it is a new
        best, that checkpoint's meta data records the value and `best` names it."""
        final = checkpoints.checkpoint_root(run_dir) / f"step_{state.step:08d}"
        if self.observe(state, {}, results, evaluated=True) and dist.rank() == 0 and final.is_dir():
            checkpoints.update_meta(final, {"best_value": state.best_value, "best_step": state.step})
            checkpoints.point_best(run_dir, final)

    def value(self, metrics: Mapping[str, float], results: Results, evaluated: bool) -> Optional[float]:
        if not self.metric:
            return None
        if self.metric == VAL_LOSS:
            return metrics.get(VAL_LOSS)
        if not evaluated:
            return None
        dataset, _, name = self.metric.partition("/")
        found = (results or {}).get(dataset, {}).get(name)
        problem = None
        if dist.rank() == 0 and not isinstance(found, (int, float)):
            named = sorted(k for k, v in (results or {}).get(dataset, {}).items() if isinstance(v, (int, float)))
            problem = (
                f"config key 'run.keep_best': the evaluation of {dataset} has no metric {name!r} ({', '.join(named)})"
            )
        value, problem = dist.all_gather_object((found if problem is None else None, problem))[0]
        if problem:
            raise ConfigError(problem)
        return float(value)
