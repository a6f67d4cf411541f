"""N towers -> unit-norm embeddings in one space, plus the learnable logit scale the losses use."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ModelConfig
from mmcl.models.towers import TOWERS, Tower


class MultiEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.towers = nn.ModuleDict(
            {modality: TOWERS.get(tower.type)(tower, cfg.embed_dim) for modality, tower in cfg.towers.items()}
        )
        for modality, tower in cfg.towers.items():
            if tower.locked:
                self.towers[modality].requires_grad_(False)
        # Stored as log(1/temperature), as in CLIP, so the optimiser works on an unconstrained value.
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        self.max_logit_scale = cfg.max_logit_scale

    @property
    def modalities(self) -> list:
        return list(self.towers.keys())

    def encode(self, modality: str, inputs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.towers[modality](inputs)  # (B, embed_dim)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Embeds every modality present in `inputs` that has a tower."""
        return {m: self.encode(m, x) for m, x in inputs.items() if m in self.towers}

    def preprocessors(self, train: bool) -> Dict[str, Callable]:
        return {m: tower.preprocess(train) for m, tower in self.towers.items()}

    def tower(self, modality: str) -> Tower:
        return self.towers[modality]  # type: ignore[return-value]

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        # CLIP clamps the temperature at 1/100: beyond it training becomes unstable.
        self.logit_scale.clamp_(0, self.max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp()

