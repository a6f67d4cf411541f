"""N towers -> unit-norm embeddings in one space, plus the learnt temperature (and bias) the losses use."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import AugmentConfig, ModelConfig, TowerConfig
from mmcl.errors import ConfigError
from mmcl.models.towers import TOWERS, Tower
from mmcl.models.tuning import check_tuning, frozen_steps


class Encoded(NamedTuple):
    """What the model gives the loss: unit-norm embeddings by modality, (B, D) each, and the logit
    scale (the multiplier, exp of the learnt log-scale) and bias (SigLIP's, else None), 0-dim."""

    embeddings: Dict[str, torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor]


class Similarity(nn.Module):
    """The learnt logit scale (log of 1/temperature, as in CLIP) and optional logit bias (SigLIP).

    Parameters are (1,) rather than 0-dim because DeepSpeed's parameter broadcast cannot view 0-dim
    tensors as bytes. Being a module, calling it inside a forward lets ZeRO-3 gather them like any weight.
    """

    def __init__(self, init_logit_scale: float, max_logit_scale: float, init_logit_bias: Optional[float]) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full((1,), float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale

    def forward(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # CLIP keeps the temperature above 1/100 by clamping the parameter after each step; clamping in
        # the forward gives the same logits and needs no in-place edit of a (possibly sharded) parameter.
        scale = self.logit_scale.clamp(0, self.max_logit_scale).exp()[0]  # (1,) -> ()
        bias = None if self.logit_bias is None else self.logit_bias[0]
        return scale, bias


class MultiEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.towers = nn.ModuleDict(
            {modality: TOWERS.get(tower.type)(tower, cfg.embed_dim) for modality, tower in cfg.towers.items()}
        )
        self.tower_cfgs: Dict[str, TowerConfig] = dict(cfg.towers)  # what the optimiser's groups read
        for modality in self.towers:
            frozen = self.frozen_steps(modality)
            for name, param in self.tower(modality).named_parameters():
                if frozen[name] is None:  # never trains; one unlocked later keeps its gradient
                    param.requires_grad_(False)
        self.similarity = Similarity(cfg.init_logit_scale, cfg.max_logit_scale, cfg.init_logit_bias)

    @property
    def modalities(self) -> list:
        return list(self.towers.keys())

    def encode(self, modality: str, inputs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.towers[modality](inputs)  # (B, embed_dim)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Encoded:
        """The embeddings of every modality in `inputs` that has a tower, with the logit scale and bias.

        Everything a loss needs comes out of this one call, so a wrapping engine (DeepSpeed ZeRO-3)
        sees every parameter used inside its forward.
        """
        embeddings = {m: self.encode(m, x) for m, x in inputs.items() if m in self.towers}
        return Encoded(embeddings, *self.similarity())

    def preprocessors(self, train: bool, augment: Optional[AugmentConfig] = None) -> Dict[str, Callable]:
        """Each tower's preprocessing; in training with `augment`'s policy for the tower's input kind."""
        policies = {"image": augment.image, "audio": augment.audio} if train and augment is not None else {}
        return {m: self.tower(m).preprocess(train, policies.get(self.tower(m).input_kind)) for m in self.modalities}

    def tower(self, modality: str) -> Tower:
        return self.towers[modality]  # type: ignore[return-value]

    def trains(self, modality: str) -> bool:
        """Whether any of the tower's parameters takes gradients (False: frozen whole)."""
        return any(param.requires_grad for param in self.tower(modality).parameters())

    def frozen_steps(self, modality: str) -> Dict[str, Optional[int]]:
        """Per parameter of the tower: the steps it stays unchanged from the start (None: throughout)."""
        return frozen_steps(self.tower(modality), self.tower_cfgs[modality])


def check_model_config(cfg: ModelConfig, key: str = "model") -> None:
    """Everything MultiEncoder(cfg) needs, checked without building it: a ConfigError names the key."""
    if len(cfg.towers) < 2:
        raise ConfigError(f"config key '{key}.towers': at least two towers are needed")
    for modality, tower in cfg.towers.items():
        tower_key = f"{key}.towers.{modality}"
        TOWERS.check(tower.type, f"{tower_key}.type")
        tower_class = TOWERS.get(tower.type)
        tower_class.check(tower, tower_key)
        check_tuning(tower, tower_key, tower_class.blocks_in(tower, tower_key))
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise ConfigError(f"config key '{key}.init_from': {cfg.init_from} does not exist")


def load_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device) -> MultiEncoder:
    """A plain, unsharded model holding `weights`, in evaluation mode on `device`."""
    model = MultiEncoder(cfg)
    model.load_state_dict(weights)
    return model.to(device).eval()
