"""One optimisation step on one batch: gradients (by the backward chosen at build time), then the engine's step."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch

from mmcl.train.engine import Engine
from mmcl.train.gradcache import Backward


def train_step(
    engine: Engine, loss_fn: Callable, backward: Backward, inputs: Mapping[str, torch.Tensor], autocast: torch.autocast
) -> Dict[str, float]:
    # Fills .grad, plainly or through the gradient cache; returns the loss, its parts and the logit scale used.
    out = backward(engine, loss_fn, inputs, autocast)
    metrics = {name: value.item() for name, value in out.items()}
    metrics.update(engine.step())
    return metrics
