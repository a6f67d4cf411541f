"""Numeric precision: the autocast a step runs under, the weights' dtype under DeepSpeed, DeepSpeed's
precision sections, and fp16's dynamic loss scale for the torch engine.

fp16 has 5 exponent bits: gradients below ~6e-8 round to zero and those below ~6e-5 lose digits. The
loss is therefore multiplied by a large scale before backward and the gradients divided by it before the
optimiser sees them; a step whose scaled gradients overflowed to Inf/NaN is skipped and the scale halved,
and after `loss_scale_window` clean steps the scale doubles. Both engines follow DeepSpeed's rules.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from mmcl.config import EngineConfig, LossScaleConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast of every forward: off under fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed holds the model's weights in (its optimiser keeps fp32 master copies)."""
    return AUTOCAST_DTYPES.get(precision, torch.float32)


def deepspeed_precision(cfg: EngineConfig) -> Dict[str, Any]:
    """The precision sections of DeepSpeed's config: always "bf16", and "fp16" when it is on."""
    sections: Dict[str, Any] = {"bf16": {"enabled": cfg.precision == "bf16"}}
    if cfg.precision == "fp16":
        scale = cfg.loss_scale
        sections["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0: dynamic
            "initial_scale_power": scale.initial_scale_power,
            "loss_scale_window": scale.loss_scale_window,
            "hysteresis": scale.hysteresis,
            "min_loss_scale": scale.min_loss_scale,
        }
    return sections


class DynamicLossScale:
    """fp16's loss scale for the torch engine: torch.amp.GradScaler (which halves the scale on an overflow
    and doubles it after `loss_scale_window` clean steps) with DeepSpeed's hysteresis and floor on top, so
    the two engines read the same keys the same way."""

    def __init__(self, cfg: LossScaleConfig, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=2.0**cfg.initial_scale_power, growth_interval=cfg.loss_scale_window
        )
        self.hysteresis = cfg.hysteresis
        self.min_scale = float(cfg.min_loss_scale)
        self.overflows_left = cfg.hysteresis  # DeepSpeed's delayed_shift

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place: clipping and the logged norm see the true ones."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, finite: bool) -> Dict[str, float]:
        """The optimiser's step unless a gradient overflowed, then the scale's update; the step's metrics."""
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)  # skipped when unscale_ found an Inf/NaN
        self.scaler.update()  # halved after an overflow (its count of clean steps restarts), or doubled
        overflow = not finite
        if overflow and self.overflows_left > 1:  # hysteresis: this overflow skips the step only
            self.overflows_left -= 1
            self.scaler.update(new_scale=scale)
        elif self.scaler.get_scale() > scale:
            self.overflows_left = self.hysteresis
        if self.scaler.get_scale() < self.min_scale:
            self.scaler.update(new_scale=self.min_scale)
        # An overflow at the floor is no longer the scale's fault: it counts as a non-finite step.
        at_floor = overflow and scale <= self.min_scale
        return {"loss_scale": scale, "overflow": float(overflow and not at_floor), "nonfinite": float(at_floor)}

    def state_dict(self) -> Dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "overflows_left": self.overflows_left}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.overflows_left = state["overflows_left"]


def build_loss_scale(cfg: EngineConfig, device: torch.device) -> Optional[DynamicLossScale]:
    """The torch engine's loss scale: fp16 only (bf16 has fp32's exponent range and needs none)."""
    return DynamicLossScale(cfg.loss_scale, device) if cfg.precision == "fp16" else None
