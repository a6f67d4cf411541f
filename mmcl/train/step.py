"""One optimisation step on one batch: gradients (by the backward chosen at build time), clip, update."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch

from mmcl.models import MultiEncoder
from mmcl.train.gradcache import Backward


def train_step(model: MultiEncoder, loss_fn: Callable, backward: Backward, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, inputs: Mapping[str, torch.Tensor],
               grad_clip: float, autocast: torch.autocast) -> Dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    out = backward(model, loss_fn, inputs, autocast)  # fills .grad: plainly or through the gradient cache
    params = [p for p in model.parameters() if p.grad is not None]
    # max_norm=inf measures the norm without clipping, so it is logged either way.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    model.clamp_logit_scale()
    metrics = {name: value.item() for name, value in out.items()}
    metrics.update(grad_norm=grad_norm.item(), lr=lr, logit_scale=model.scale().item())
    return metrics
