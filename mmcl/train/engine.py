"""The engine: the one owner of the optimiser step, and the only user of DeepSpeed.

Both engines offer the same five operations, so the step, the gradient cache and the loop never ask
which one they hold:
  forward(inputs) -> (embeddings, logit_scale, logit_bias)   through the (wrapped) model
  backward(loss)                                             one micro-step's gradients
  step() -> {"grad_norm", "lr"}                               after `micro_steps` backward calls
  save(directory, client_state) / load(directory) -> client_state   collective on every process

- "torch": one process, plain PyTorch AdamW, clipping and schedule.
- "deepspeed": any number of processes, ZeRO stage 0-3, bf16. DeepSpeed counts micro-steps itself
  (gradient_accumulation_steps = backward calls per step, e.g. the gradient cache's chunks), so
  `backward` is DeepSpeed's backward + step and the optimiser moves on the last micro-step.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mmcl import dist
from mmcl.config import Config
from mmcl.models import MultiEncoder
from mmcl.train.optim import build_optimizer, build_schedule

TORCH_STATE_FILE = "engine.pt"


class TorchEngine:
    def __init__(self, model: MultiEncoder, cfg: Config, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if dist.world_size() > 1:
            raise ValueError("engine.backend=torch runs one process; use engine.backend=deepspeed "
                             "(engine.zero_stage=0 is plain data parallelism) for several")
        self.model = model
        self.optimizer = optimizer or build_optimizer(model, cfg.optim)
        self.scheduler = build_schedule(self.optimizer, cfg.optim, cfg.run.steps)
        self.grad_clip = cfg.optim.grad_clip

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        return self.model(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> Dict[str, float]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # max_norm=inf measures the norm without clipping, so it is logged either way.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        finite = bool(torch.isfinite(grad_norm))
        if finite:  # a NaN/Inf gradient would poison every weight it touches: skip the update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm.item(), "lr": lr, "nonfinite": float(not finite)}

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client": client_state}
        torch.save(state, Path(directory) / TORCH_STATE_FILE)

    def load(self, directory: Path) -> Dict[str, Any]:
        state = torch.load(Path(directory) / TORCH_STATE_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]

    def model_state(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()


class DeepSpeedEngine:
    TAG = "deepspeed"

    def __init__(self, model: MultiEncoder, cfg: Config, micro_steps: int, device: torch.device,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by DeepSpeed at import
        # DeepSpeed's ZeRO calls collectives that torch marks deprecated, once per bucket per step.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        import deepspeed

        dist.init_from_env(lone_group=True)  # DeepSpeed uses the launcher's process group; it must exist first
        optimizer = optimizer or build_optimizer(model, cfg.optim)
        scheduler = build_schedule(optimizer, cfg.optim, cfg.run.steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": micro_steps,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.engine.zero_stage},
            "bf16": {"enabled": cfg.engine.precision == "bf16"},
            "steps_per_print": 2 ** 31,
            "zero_allow_untested_optimizer": True,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.deepspeed = deepspeed
        self._grad_norm = float("nan")
        self.dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32

    @property
    def model(self) -> MultiEncoder:
        return self.engine.module

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        # With bf16, DeepSpeed holds the weights in bf16 (fp32 master copies in the optimiser):
        # floating-point inputs must match them. Token ids stay integers.
        inputs = {m: x.to(self.dtype) if x.is_floating_point() else x for m, x in inputs.items()}
        return self.engine(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # scale_wrt_gas=False: each micro-step's loss is already its exact share of the batch loss.
        self.engine.backward(loss, scale_wrt_gas=False)
        if boundary and self.engine.get_global_grad_norm() is None:
            # Without ZeRO, DeepSpeed clips but does not keep the norm: measure the averaged gradients
            # before its step consumes them.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads).item()
            if not math.isfinite(self._grad_norm):
                # ZeRO 1-3 discard a step with a NaN/Inf gradient norm themselves; without ZeRO, drop
                # the (all-reduced, so identical everywhere) gradients: the optimiser then skips every
                # parameter, as the torch engine does.
                for param in self.engine.module.parameters():
                    param.grad = None
        self.engine.step()  # a no-op until the last micro-step of the batch

    def step(self) -> Dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        # A NaN/Inf gradient norm means the update was skipped (by ZeRO's overflow check, or above).
        return {"grad_norm": float(grad_norm), "nonfinite": float(not math.isfinite(float(grad_norm))),
                "lr": self.scheduler.get_last_lr()[0] if self.scheduler else float("nan")}

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, client_state=client_state, save_latest=False)

    def load(self, directory: Path) -> Dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(str(directory), tag=self.TAG)
        return client_state

    def model_state(self) -> Dict[str, torch.Tensor]:
        """The full model weights on every process (gathered from ZeRO-3 shards when sharded)."""
        params = list(self.model.parameters())
        with self.deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


Engine = TorchEngine | DeepSpeedEngine


def build_engine(model: MultiEncoder, cfg: Config, micro_steps: int, device: torch.device) -> Engine:
    if cfg.engine.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg, micro_steps, device)
    return TorchEngine(model, cfg)
