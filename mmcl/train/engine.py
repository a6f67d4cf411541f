"""The engine: the one owner of the optimiser step, and the only user of DeepSpeed.

Both engines keep one contract (`Engine`), so the step, the gradient cache, checkpoints and the trainer
never ask which one they hold:
- "torch": one process, plain PyTorch AdamW, clipping and schedule; fp16 through torch.amp.GradScaler.
- "deepspeed": any number of processes, ZeRO stage 0-3, bf16 or fp16 (with DeepSpeed's own loss
  scaling). DeepSpeed counts micro-steps itself (gradient_accumulation_steps = backward calls per step,
  e.g. the gradient cache's chunks), so `backward` is DeepSpeed's backward + step and the optimiser
  moves on the last micro-step.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from mmcl import dist
from mmcl.checkpoint.state import DEEPSPEED_TAG
from mmcl.config import EngineConfig, OptimConfig
from mmcl.errors import ConfigError
from mmcl.models import Encoded, MultiEncoder
from mmcl.train.optim import build_optimizer, build_schedule
from mmcl.train.precision import DynamicLossScale, build_loss_scale, deepspeed_precision, weights_dtype

TORCH_STATE_FILE = "engine.pt"


class Engine(Protocol):
    """What a training step needs of an engine."""

    @property
    def model(self) -> MultiEncoder:
        """The (unwrapped) model: its towers' preprocessing, its modalities."""

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Encoded:
        """Embeddings and logit scale/bias through the (possibly wrapped) model."""

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-step's gradients."""

    def step(self) -> Dict[str, float]:
        """The optimiser step after the step's last backward: {"grad_norm", "lr", "nonfinite"}, and under
        fp16 {"loss_scale" (the one this step used), "overflow" (1: skipped for it)}."""

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None:
        """Collective: the engine's full state (sharded under ZeRO) into `directory`."""

    def load(self, directory: Path) -> Dict[str, Any]:
        """Collective: restore what `save` wrote; returns its client state."""

    def model_state(self) -> Dict[str, torch.Tensor]:
        """Collective: the full model weights on every process."""

    def held_weights(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> the tensor of its values this process holds, itself (writing into it changes
        the weight): the whole parameter, or under ZeRO-3 this process's flat partition. Read by
        `model_state`, so values written here are what it returns."""


def check_engine_config(cfg: EngineConfig, modalities: Sequence[str], batch_size: int, key: str = "engine") -> None:
    scale = cfg.loss_scale
    if scale.min_loss_scale > 2**scale.initial_scale_power:
        raise ConfigError(
            f"config key '{key}.loss_scale.min_loss_scale': {scale.min_loss_scale} is above the initial scale "
            f"2**{key}.loss_scale.initial_scale_power = {2**scale.initial_scale_power}"
        )
    for modality, chunk in cfg.grad_cache.items():
        if modality not in modalities:
            raise ConfigError(f"config key '{key}.grad_cache.{modality}': no tower {modality!r}")
        if not 1 <= chunk <= batch_size:
            raise ConfigError(
                f"config key '{key}.grad_cache.{modality}': chunk size {chunk} must be in "
                f"1..data.batch_size ({batch_size})"
            )


class TorchEngine:
    def __init__(
        self,
        model: MultiEncoder,
        optim: OptimConfig,
        total_steps: int,
        optimizer: Optional[torch.optim.Optimizer] = None,
        loss_scale: Optional[DynamicLossScale] = None,
    ) -> None:
        if dist.world_size() > 1:
            raise ConfigError(
                "config key 'engine.backend': torch runs one process; use deepspeed "
                "(engine.zero_stage=0 is plain data parallelism) for several"
            )
        self.model = model
        self.optimizer = optimizer or build_optimizer(model, optim)
        self.scheduler = build_schedule(self.optimizer, optim, total_steps)
        self.grad_clip = optim.grad_clip
        self.loss_scale = loss_scale  # fp16 only

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Encoded:
        return self.model(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (self.loss_scale.scale(loss) if self.loss_scale else loss).backward()

    def step(self) -> Dict[str, float]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.loss_scale:  # clipping and the logged norm are about the true gradients
            self.loss_scale.unscale(self.optimizer)
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:  # measured for the log only: clipping at infinity would still rescale every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        lr = self.optimizer.param_groups[0]["lr"]
        finite = bool(torch.isfinite(grad_norm))
        metrics = {"grad_norm": grad_norm.item(), "lr": lr, "nonfinite": float(not finite)}
        if self.loss_scale:  # an overflow skips the step and lowers the scale: normal under fp16
            metrics.update(self.loss_scale.step(self.optimizer, finite))
        elif finite:  # a NaN/Inf gradient would poison every weight it touches: skip the update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "client": client_state,
        }
        if self.loss_scale:
            state["loss_scale"] = self.loss_scale.state_dict()
        torch.save(state, Path(directory) / TORCH_STATE_FILE)

    def load(self, directory: Path) -> Dict[str, Any]:
        state = torch.load(Path(directory) / TORCH_STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.loss_scale and "loss_scale" in state:  # absent from an fp32/bf16 run's checkpoint: start afresh
            self.loss_scale.load_state_dict(state["loss_scale"])
        return state["client"]

    def model_state(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def held_weights(self) -> Dict[str, torch.Tensor]:
        return {name: param.data for name, param in self.model.named_parameters()}


@dataclass
class StepShape:
    """How the run steps: what the schedule and DeepSpeed's batch accounting need to know."""

    total_steps: int  # optimiser steps in the whole run
    micro_batch: int  # samples each process puts through one backward call
    micro_steps: int  # backward calls per optimiser step (the gradient cache's chunks)


def deepspeed_config(cfg: EngineConfig, optim: OptimConfig, shape: StepShape) -> Dict[str, Any]:
    """DeepSpeed's config for this run (its batch accounting, clipping, ZeRO stage and precision)."""
    return {
        "train_micro_batch_size_per_gpu": shape.micro_batch,
        "gradient_accumulation_steps": shape.micro_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        **deepspeed_precision(cfg),
        "steps_per_print": 2**31,
        "zero_allow_untested_optimizer": True,
    }


class DeepSpeedEngine:
    def __init__(
        self,
        model: MultiEncoder,
        cfg: EngineConfig,
        optim: OptimConfig,
        shape: StepShape,
        device: torch.device,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> None:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by DeepSpeed when it is imported
        # DeepSpeed's ZeRO calls collectives that torch marks deprecated, once per bucket per step.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        import deepspeed  # here, not at the top: its import reads DS_ACCELERATOR and takes seconds

        dist.init_from_env(device, lone_group=True)  # DeepSpeed uses the launcher's process group; it must exist first
        optimizer = optimizer or build_optimizer(model, optim)
        scheduler = build_schedule(optimizer, optim, shape.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, optim, shape),
            dist_init_required=False,
        )
        self.gathered_parameters = deepspeed.zero.GatheredParameters
        # Imported here with deepspeed (above): a ZeRO-3 parameter's status (gathered or partitioned).
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.available = ZeroParamStatus.AVAILABLE
        self.sharded = self.engine.zero_optimization_stage() == 3
        self._grad_norm = float("nan")
        self.dtype = weights_dtype(cfg.precision)
        self.fp16 = cfg.precision == "fp16"
        self._scale_metrics: Dict[str, float] = {}

    @property
    def model(self) -> MultiEncoder:
        return self.engine.module

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Encoded:
        # With bf16/fp16, DeepSpeed holds the weights in that dtype (fp32 master copies in the optimiser):
        # floating-point inputs must match them. Token ids stay integers.
        inputs = {m: x.to(self.dtype) if x.is_floating_point() else x for m, x in inputs.items()}
        return self.engine(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # scale_wrt_gas=False: each micro-step's loss is already its exact share of the batch loss.
        self.engine.backward(loss, scale_wrt_gas=False)  # under fp16, DeepSpeed scales the loss first
        if boundary and self.fp16:  # DeepSpeed's fp16 optimisers check the scaled gradients themselves
            self._step_with_loss_scale()
            return
        if boundary and self.engine.get_global_grad_norm() is None:
            self._drop_nonfinite_gradients()
        self.engine.step()  # a no-op until the last micro-step of the batch

    def _step_with_loss_scale(self) -> None:
        """The last micro-step under fp16: DeepSpeed's step, noting the scale it used and whether it
        skipped the update for an overflow (it then leaves the schedule where it was)."""
        scale, skipped = self.engine._get_optimizer_loss_scale(), self.engine.skipped_steps  # no public getter
        self.engine.step()
        self._scale_metrics = {"loss_scale": float(scale), "overflow": float(self.engine.skipped_steps > skipped)}

    def _drop_nonfinite_gradients(self) -> None:
        # Without ZeRO, DeepSpeed clips but does not keep the norm: measure the averaged gradients before
        # its step consumes them. ZeRO 1-3 discard a step with a NaN/Inf gradient norm themselves;
        # without ZeRO, drop the (all-reduced, so identical everywhere) gradients: the optimiser then
        # skips every parameter, as the torch engine does.
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        self._grad_norm = torch.nn.utils.get_total_norm(grads).item()
        if not math.isfinite(self._grad_norm):
            for param in self.engine.module.parameters():
                param.grad = None

    def step(self) -> Dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        # A NaN/Inf gradient norm means the update was skipped (by ZeRO's overflow check, or above). Under
        # fp16 that is an overflow, which lowers the scale (DeepSpeed stops the run at its floor).
        nonfinite = not math.isfinite(float(grad_norm)) and not self._scale_metrics.get("overflow")
        return {
            "grad_norm": float(grad_norm),
            "nonfinite": float(nonfinite),
            "lr": self.scheduler.get_last_lr()[0] if self.scheduler else float("nan"),
            **self._scale_metrics,
        }

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state=client_state, save_latest=False)

    def load(self, directory: Path) -> Dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        return client_state

    def model_state(self) -> Dict[str, torch.Tensor]:
        """The full model weights on every process (gathered from ZeRO-3 shards when sharded)."""
        params: List[Any] = list(self.model.parameters())  # under ZeRO-3, with DeepSpeed's ds_* attributes
        # ZeRO-3 keeps its small ("persistent") parameters gathered between steps, refreshed from their
        # partitions only after each optimiser step: partition them first, so that every value below is
        # gathered from the partitions (`held_weights`, which the EMA swaps). All-gathers copy: the values
        # are the partitions' bit for bit. Every parameter is left partitioned, as the gather's exit
        # leaves the others: the next forward gathers them from the partitions as they are then.
        kept = [p for p in params if self.sharded and p.ds_status == self.available]
        if kept:
            kept[0].partition(kept)
        with self.gathered_parameters(params, enabled=self.sharded):
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return state

    def held_weights(self) -> Dict[str, torch.Tensor]:
        """Whole parameters (ZeRO 0-2: each process holds them all, in the training precision), or under
        ZeRO-3 each parameter's flat partition on this process (`ds_tensor`, padded at the end)."""
        named: List[Tuple[str, Any]] = list(self.model.named_parameters())  # ZeRO-3 adds ds_tensor
        if self.sharded:
            return {name: param.ds_tensor for name, param in named}
        return {name: param.data for name, param in named}


def build_engine(
    model: MultiEncoder, cfg: EngineConfig, optim: OptimConfig, shape: StepShape, device: torch.device
) -> Engine:
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg, optim, shape, device)
    return TorchEngine(model, optim, shape.total_steps, loss_scale=build_loss_scale(cfg, device))
