"""An exponential moving average (EMA) of the weights, as timm's ModelEmaV2/V3 keep it:
ema <- decay * ema + (1 - decay) * weights after every optimiser step.

The average is held in float32 whatever the training precision (a bf16 weight keeps about three
significant digits, too few for updates of (1 - decay) ~ 1e-4 of the difference to register), and of
exactly the tensors the engine says this process holds (`Engine.held_weights`): whole parameters for
the torch engine and ZeRO 0-2, this process's partition of each parameter under ZeRO-3, so the
average is sharded as the weights are. Its full weights are the engine's own `model_state` with the
average swapped into those tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from mmcl.config import OptimConfig
from mmcl.errors import CheckpointError
from mmcl.train.engine import Engine

EMA_PREFIX = "ema/"  # the average's evaluation results are logged as eval/ema/<dataset>/<metric>


class WeightAverage:
    """The EMA of the weights this process holds; every method but `update` and `full_weights` is local."""

    def __init__(self, engine: Engine, decay: float, start_step: int) -> None:
        self.engine, self.decay, self.start_step = engine, decay, start_step
        self.average: Dict[str, torch.Tensor] = {}
        self.restart()

    def restart(self) -> None:
        """Start the average from the current weights."""
        self.average = {
            name: weight.detach().to(torch.float32, copy=True) for name, weight in self.engine.held_weights().items()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimiser step `step` (counted from 1): average the new weights in, or copy them until
        `start_step`."""
        weights = self.engine.held_weights()
        averages = list(self.average.values())
        # float32 copies of bf16 weights; float32 weights pass as themselves
        values = [weights[name].to(torch.float32) for name in self.average]
        if step <= self.start_step:
            torch._foreach_copy_(averages, values)
        else:
            # lerp: ema + (1 - decay) * (w - ema) = decay * ema + (1 - decay) * w, and a weight that does
            # not move (a frozen tower) leaves its average bitwise unchanged, which the product form
            # does not promise in floating point.
            torch._foreach_lerp_(averages, values, 1.0 - self.decay)

    def state(self) -> Dict[str, torch.Tensor]:
        """This process's averages by parameter name (partitions under ZeRO-3), for its checkpoint file."""
        return self.average

    def load_state(self, state: Mapping[str, torch.Tensor], source: Path) -> None:
        """Restore what `state` returned (bitwise), checked against this process's parameters."""
        if set(state) != set(self.average) or any(state[k].shape != v.shape for k, v in self.average.items()):
            raise CheckpointError(
                f"{source}: its EMA does not hold this model's parameters (as this process holds them)"
            )
        for name, average in self.average.items():
            average.copy_(state[name])

    @torch.no_grad()
    def full_weights(self) -> Dict[str, torch.Tensor]:
        """Collective: the full state dict (as `Engine.model_state`) with the average in place of every
        parameter; buffers are the model's own.

        The average is copied into the tensors the process holds, the engine gathers them as it gathers
        the weights, and the raw values are copied back from a copy kept meanwhile. With float32 weights
        every step is a copy, so the result is the average bit for bit and training resumes on exactly
        its weights. With bf16 weights the held tensors are bf16: the result is the average rounded to
        bf16 (the precision model.safetensors has too), while the float32 average itself lives on. The
        raw copy costs one more copy of the held weights while it lasts."""
        held = self.engine.held_weights()
        raw = {name: tensor.clone() for name, tensor in held.items()}
        try:
            for name, tensor in held.items():
                tensor.copy_(self.average[name])
            # cloned: the torch engine's state dict shares storage with the parameters restored below
            return {name: value.clone() for name, value in self.engine.model_state().items()}
        finally:
            for name, tensor in held.items():
                tensor.copy_(raw[name])


def build_average(engine: Engine, optim: OptimConfig) -> Optional[WeightAverage]:
    """The run's EMA of the weights, or None when `optim.ema_decay` is 0 (nothing is computed or saved)."""
    return WeightAverage(engine, optim.ema_decay, optim.ema_start_step) if optim.ema_decay > 0 else None


def ema_report_path(out_path: Path) -> Path:
    """Where the average's evaluation goes beside the raw weights': eval.json -> eval_ema.json."""
    return out_path.with_name(f"{out_path.stem}_ema{out_path.suffix}")


def with_ema_results(
    raw: Optional[Dict[str, Dict[str, Any]]], ema: Optional[Dict[str, Dict[str, Any]]]
) -> Optional[Dict[str, Dict[str, Any]]]:
    """Both evaluations in one mapping for the logs: the average's datasets named ema/<dataset>."""
    if raw is None or ema is None:  # not process 0
        return raw
    return {**raw, **{f"{EMA_PREFIX}{name}": metrics for name, metrics in ema.items()}}
