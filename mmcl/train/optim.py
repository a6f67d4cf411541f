"""AdamW over parameter groups (per tower; per depth under layer-wise decay; with or without weight decay;
frozen for some first steps or not), and a linear-warmup + cosine schedule that scales each group's own
learning rate."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

from mmcl import dist
from mmcl.config import OptimConfig
from mmcl.models import MultiEncoder

log = logging.getLogger("mmcl.train")


@dataclass(frozen=True)
class GroupSpec:
    name: str  # "image/block3/decay": tower, depth (under layer decay), weight decay or not, frozen steps
    lr: float  # the group's peak learning rate, which the schedule scales
    weight_decay: float
    frozen_steps: int  # the group's learning rate is 0 for this many steps from the start
    depth: int  # under layer decay (else 0): the table lists a tower's groups from the embeddings up


def param_groups(model: MultiEncoder, cfg: OptimConfig) -> List[Dict[str, Any]]:
    """The optimiser's groups: first the logit scale (and bias) at optim.lr, so group 0's rate is the one
    the log reports as `lr`, then each tower's. Weight decay on matrices only: norms, biases, embeddings'
    gains and the logit scale/bias are exempt, since shrinking them towards zero changes what the model
    computes rather than regularising it."""
    groups: Dict[GroupSpec, List[nn.Parameter]] = {
        GroupSpec("similarity/no_decay", cfg.lr, 0.0, 0, 0): [
            p for p in model.similarity.parameters() if p.requires_grad
        ]
    }
    for modality in model.modalities:
        tower: Dict[GroupSpec, List[nn.Parameter]] = {}
        for spec, param in tower_groups(model, modality, cfg):
            tower.setdefault(spec, []).append(param)
        groups.update(sorted(tower.items(), key=lambda item: (item[0].frozen_steps, item[0].depth, item[0].name)))
    return [
        {
            "params": params,
            "name": spec.name,
            "lr": spec.lr,
            "weight_decay": spec.weight_decay,
            "frozen_steps": spec.frozen_steps,
        }
        for spec, params in groups.items()
        if params
    ]


def tower_groups(model: MultiEncoder, modality: str, cfg: OptimConfig) -> Iterator[Tuple[GroupSpec, nn.Parameter]]:
    """Each trainable parameter of a tower with the group it belongs to."""
    tower, tower_cfg = model.tower(modality), model.tower_cfgs[modality]
    lr = cfg.lr if tower_cfg.lr is None else tower_cfg.lr
    weight_decay = cfg.weight_decay if tower_cfg.weight_decay is None else tower_cfg.weight_decay
    frozen = model.frozen_steps(modality)
    for name, param in tower.named_parameters():
        steps = frozen[name]
        if steps is None or not param.requires_grad:
            continue
        parts, scale, depth = [modality], 1.0, 0
        if tower_cfg.layer_decay < 1:  # one group per depth; otherwise one rate for the whole tower
            depth = tower.depth_of(name)
            scale = layer_scale(depth, tower.num_blocks, tower_cfg.layer_decay)
            parts.append(depth_name(depth, tower.num_blocks))
        decayed = param.ndim >= 2
        parts.append("decay" if decayed else "no_decay")
        if steps:
            parts.append(f"after_step{steps}")
        yield GroupSpec("/".join(parts), lr * scale, weight_decay if decayed else 0.0, steps, depth), param


def layer_scale(depth: int, num_blocks: int, layer_decay: float) -> float:
    """Layer-wise learning-rate decay as BEiT defines it (microsoft/unilm beit/optim_factory.py: layer ids
    0 for the embeddings, i + 1 for block i, L + 1 above; scale layer_decay ** (L + 1 - id)) and timm's
    param_groups_layer_decay writes it (layer_decay ** (layer_max - i), layer_max = L + 1): the head
    trains at the tower's rate, the last block at layer_decay times it, the embeddings at
    layer_decay ** (L + 1)."""
    return layer_decay ** (num_blocks + 1 - depth)


def depth_name(depth: int, num_blocks: int) -> str:
    if depth == 0:
        return "embed"
    return "head" if depth == num_blocks + 1 else f"block{depth - 1}"  # block i (from 0) is at depth i + 1


def group_table(groups: List[Dict[str, Any]]) -> str:
    """One line per group: name, parameter count, peak learning rate, weight decay, frozen steps."""
    rows = [("group", "parameters", "peak lr", "weight decay", "frozen steps")]
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        rows.append(
            (
                group["name"],
                f"{count:,}",
                f"{group['lr']:.4g}",
                f"{group['weight_decay']:g}",
                str(group["frozen_steps"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for name, *numbers in rows:  # names to the left, numbers to the right
        cells = [name.ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(numbers, widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def build_optimizer(model: MultiEncoder, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if dist.rank() == 0:
        log.info("parameter groups:\n%s", group_table(groups))
    # fused=None, not False: torch then picks its loop (or foreach on CUDA), as without the argument.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None)
    optimizer.register_load_state_dict_pre_hook(_keep_implementation)
    return optimizer


def _keep_implementation(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> Dict[str, Any]:
    """A resumed optimiser runs as this run's config says, not as the checkpoint's run did: torch's
    load_state_dict keeps each saved group's settings, `fused` and `foreach` among them, and a fused
    optimiser stepping the loop fails under fp16's loss scale. Done before loading, so that torch then
    places each `step` counter where the fused kernel wants it (on the parameter's device)."""
    implementation = [{k: group[k] for k in ("fused", "foreach")} for group in optimizer.param_groups]
    groups = [{**saved, **now} for saved, now in zip(state["param_groups"], implementation, strict=True)]
    return {**state, "param_groups": groups}


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def group_factor(cfg: OptimConfig, total_steps: int, frozen_steps: int) -> Callable[[int], float]:
    """A group's multiplier: 0 through its first `frozen_steps` steps (warm-up or not), then the schedule's.
    AdamW at rate 0 leaves a weight bitwise unchanged, its decoupled decay (p *= 1 - lr * wd) included."""

    # A plain function, not a callable object: LambdaLR's state_dict keeps an object's attributes (this
    # config), which a checkpoint loaded with weights_only=True would refuse.
    def factor(step: int) -> float:
        return 0.0 if step < frozen_steps else lr_factor(step, cfg, total_steps)

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplies each group's initial learning rate by its own factor, so groups keep their
    ratios (tower rates, layer decay) over warm-up and cosine."""
    factors = [group_factor(cfg, total_steps, group.get("frozen_steps", 0)) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
