"""SigLIP (Zhai et al., 2023): an independent binary classification per pair, with learnable bias.

loss = -1/B sum_ij log sigmoid(z_ij * (scale * a_i . b_j + bias)), z_ij = +1 if i == j else -1.

Distributed, each process scores its own rows against every candidate, by one of two exchanges:
- "gather": all-gather the b embeddings (with gradients) and score local rows against all of them;
- "ring": keep b local and pass it around the ring world-1 times (gradients travel back the same way),
  so no process ever holds more than two blocks of b or any global logits (big_vision's chunked form).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mmcl import dist
from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses.base import ContrastiveLoss, PairInputs, single_view
from mmcl.losses.registry import LOSSES


def _block(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor],
    positive: Optional[torch.Tensor],
) -> torch.Tensor:
    """Summed pair losses of rows `a` against columns `b`; `positive[i]` is row i's positive column, if any."""
    logits = logit_scale * a @ b.T  # (R, D) x (D, C) -> (R, C)
    if logit_bias is not None:
        logits = logits + logit_bias
    signs = -torch.ones_like(logits)
    if positive is not None:
        signs[torch.arange(a.shape[0], device=a.device), positive] = 1.0
    return -F.logsigmoid(signs * logits).sum()


@LOSSES.register("siglip")
class SigLIP(ContrastiveLoss):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.gathers = cfg.siglip_exchange == "gather"
        self.takes_missing = self.gathers  # the ring passes equal-sized blocks: no subsets

    @classmethod
    def check(cls, cfg: LossConfig, modalities: Sequence[str], optional: Sequence[str], key: str) -> None:
        super().check(cfg, modalities, optional, key)
        if optional and cfg.siglip_exchange == "ring":
            raise ConfigError(
                f"config key '{key}.name': siglip with siglip_exchange=ring cannot score batches "
                "with missing modalities (data.optional_modalities, or a source lacking one); use gather"
            )

    def pair_loss(self, pair: PairInputs) -> torch.Tensor:
        if pair.negatives_a is not None or pair.negatives_b is not None:
            raise ConfigError("loss 'siglip' takes no explicit hard negatives")
        local_a, local_b = single_view(pair.local_a, "siglip"), single_view(pair.local_b, "siglip")
        if self.cfg.siglip_exchange == "gather":
            total = _block(
                local_a, single_view(pair.global_b, "siglip"), pair.logit_scale, pair.logit_bias, pair.positive
            )
        else:
            diagonal = torch.arange(local_a.shape[0], device=local_a.device)
            total = _block(local_a, local_b, pair.logit_scale, pair.logit_bias, diagonal)
            visiting = local_b
            for _ in range(dist.world_size() - 1):
                visiting = dist.ring_shift_with_grad(visiting)  # another process's b: negatives only
                total = total + _block(local_a, visiting, pair.logit_scale, pair.logit_bias, positive=None)
        return total / local_a.shape[0]
