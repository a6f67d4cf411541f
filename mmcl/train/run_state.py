"""The run's counters, and the health check that stops a run which has stopped making sense."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from mmcl import dist
from mmcl.data import Batch
from mmcl.errors import TrainingHalted


@dataclass
class RunState:
    """The run's counters, saved in every checkpoint's meta data and restored on resume."""

    step: int = 0
    samples_seen: int = 0  # by every process
    samples_skipped: int = 0  # unreadable samples this process's stream dropped (each process keeps its own)
    nonfinite_steps: int = 0  # steps with a NaN/Inf loss or gradient (their updates were skipped)
    nonfinite_in_a_row: int = 0
    # fp16 steps skipped because the scaled gradients overflowed: normal while the loss scale settles
    # (it starts high), so they do not count as non-finite steps.
    overflow_steps: int = 0
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))  # the trackers' (W&B) id of this run
    samples_per_source: List[int] = field(default_factory=list)  # by every process, per "::" source of data.train
    best_value: Optional[float] = None  # run.keep_best's metric at its best so far (None: not seen yet)
    best_step: int = 0  # the step of that value, whose checkpoint checkpoints/best names

    def advance(self, batch: Batch, metrics: Dict[str, float]) -> None:
        bad = metrics.get("nonfinite", 0.0) > 0 or not math.isfinite(metrics["loss"])
        self.step += 1
        self.samples_seen += len(batch) * dist.world_size()
        self.samples_skipped += batch.skipped
        self.nonfinite_steps += int(bad)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if bad else 0
        self.overflow_steps += int(metrics.get("overflow", 0.0) > 0)

    def count_sources(self, drawn: List[int]) -> None:
        """Add one step's samples per source (summed over the processes)."""
        if not self.samples_per_source:
            self.samples_per_source = [0] * len(drawn)
        self.samples_per_source = [a + b for a, b in zip(self.samples_per_source, drawn, strict=True)]

    @classmethod
    def from_meta(cls, meta: Dict[str, Any]) -> "RunState":
        return cls(**{name: meta[name] for name in asdict(cls()) if name in meta})


def health_problem(state: RunState, max_nonfinite_steps: int, max_skipped_fraction: float) -> Optional[str]:
    """Why the run has stopped making sense (by this process's counts), or None."""
    if state.nonfinite_in_a_row >= max_nonfinite_steps:
        return (
            f"{state.nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient "
            f"(optim.max_nonfinite_steps={max_nonfinite_steps}); lower optim.lr, set optim.grad_clip, "
            "or check the data"
        )
    skipped, seen = state.samples_skipped, state.samples_seen // dist.world_size()
    if skipped > max_skipped_fraction * (skipped + seen) and skipped + seen >= 100:
        return (
            f"{skipped} of the {skipped + seen} samples read were unreadable, more than "
            f"data.max_skipped_fraction={max_skipped_fraction}; see the warnings naming each shard and key"
        )
    return None


def check_health(state: RunState, max_nonfinite_steps: int, max_skipped_fraction: float) -> None:
    """Collective: stop every process when any one's run has stopped making sense (each process counts
    its own unreadable samples, so one may see too many while the others do not)."""
    problem = health_problem(state, max_nonfinite_steps, max_skipped_fraction)
    if dist.any_rank(problem is not None):
        raise TrainingHalted(problem or "another process found the run unhealthy; its log says why")
