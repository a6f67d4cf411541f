"""Which of a tower's parameters train, and from which step, and the checks of a tower's optimisation
settings (model.towers.<m>.lr, weight_decay, layer_decay, locked, unlocked_blocks, unlocked_norms,
unlock_after_step; their meaning is documented in mmcl/config.py's TowerConfig).

A locked tower is frozen whole (LiT), or but for its last blocks with the head above them and, if asked,
its norm layers (open_clip's --lock-image-unlocked-groups). Its frozen part may train from a given step
on (LAION-CLAP's freeze-then-unfreeze): those parameters keep requires_grad and join the optimiser from
the start, at learning rate 0 until then, because DeepSpeed fixes the optimiser's parameters when it is
built.
"""

from __future__ import annotations

from typing import Dict, Optional

from mmcl.config import TowerConfig
from mmcl.errors import ConfigError
from mmcl.models.towers import Tower


def check_tuning(cfg: TowerConfig, key: str, num_blocks: Optional[int]) -> None:
    """A ConfigError naming the key of a bad setting; `num_blocks` is the tower's (None: uncountable)."""
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"config key '{key}.lr': must be above 0 (to freeze a tower, set {key}.locked=true)")
    if cfg.weight_decay is not None and not cfg.weight_decay >= 0:
        raise ConfigError(f"config key '{key}.weight_decay': must be at least 0, got {cfg.weight_decay}")
    if not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"config key '{key}.layer_decay': must be in (0, 1], got {cfg.layer_decay}")
    unlocking = {
        "unlocked_blocks": cfg.unlocked_blocks > 0,
        "unlocked_norms": cfg.unlocked_norms,
        "unlock_after_step": cfg.unlock_after_step > 0,
    }
    for name, is_set in unlocking.items():
        if is_set and not cfg.locked:
            raise ConfigError(f"config key '{key}.{name}': applies to a locked tower; set {key}.locked=true")
    for name, counts_blocks in {"layer_decay": cfg.layer_decay < 1, "unlocked_blocks": cfg.unlocked_blocks > 0}.items():
        if counts_blocks and num_blocks is None:
            raise ConfigError(f"config key '{key}.{name}': tower type {cfg.type!r} has no transformer blocks to count")
    if num_blocks is not None and cfg.unlocked_blocks > num_blocks:
        raise ConfigError(
            f"config key '{key}.unlocked_blocks': {cfg.unlocked_blocks} is more than the tower's {num_blocks} blocks"
        )


def frozen_whole(cfg: TowerConfig) -> bool:
    """Whether none of the tower's parameters ever trains."""
    return cfg.locked and not (cfg.unlocked_blocks or cfg.unlocked_norms or cfg.unlock_after_step)


def frozen_steps(tower: Tower, cfg: TowerConfig) -> Dict[str, Optional[int]]:
    """For each of the tower's parameters, how many steps from the start it stays unchanged: 0 (it trains
    from the first step), cfg.unlock_after_step, or None (never trains)."""
    if not cfg.locked:
        return {name: 0 for name, _ in tower.named_parameters()}
    norms = tower.norm_parameter_names() if cfg.unlocked_norms else set()
    frozen = cfg.unlock_after_step or None
    return {
        name: 0 if name in norms or _in_unlocked_blocks(tower, cfg, name) else frozen
        for name, _ in tower.named_parameters()
    }


def _in_unlocked_blocks(tower: Tower, cfg: TowerConfig, name: str) -> bool:
    # The last N of L blocks are at depths L - N + 1 .. L, the head above them at L + 1.
    return cfg.unlocked_blocks > 0 and tower.depth_of(name) > tower.num_blocks - cfg.unlocked_blocks
