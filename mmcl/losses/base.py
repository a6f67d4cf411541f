"""What every contrastive loss shares: the call shape, the choice of modality pairs, the gathering.

Call shape: `loss(embeddings, logit_scale, logit_bias=None, negatives=None) -> {"loss": ..., <pair>: ...}`
- embeddings: modality -> this process's unit-norm rows, (B, D), or (B, K, D) for K views/captions.
- logit_scale: the multiplier (exp of the learnt log-scale); logit_bias: SigLIP's bias, else None.
- negatives: optional modality -> (B, H, D) explicit hard negatives, extra candidates of that modality.

Distributed: embeddings are all-gathered with gradients and each process computes only the rows of
its own samples against every process's candidates (the "local loss"). The returned value is the
process's share: the mean over processes equals the single-process loss on the concatenated batch,
and the gradients, summed by the gather's backward and averaged by data parallelism, equal its
gradients.
"""

from __future__ import annotations

from itertools import combinations
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mmcl import dist
from mmcl.config import LossConfig

Embeddings = Mapping[str, torch.Tensor]


class ContrastiveLoss(nn.Module):
    gathers = True  # whether pair_loss needs every process's embeddings (global_a, global_b)

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def pairs(self, modalities: List[str]) -> List[Tuple[str, str, float]]:
        """(a, b, weight) for every pair the loss sums: configured pairs, anchor pairs, or all pairs."""
        if self.cfg.pairs:
            chosen = [tuple(p.split("-")) for p in self.cfg.pairs]
        elif self.cfg.anchor:
            chosen = [(self.cfg.anchor, m) for m in modalities if m != self.cfg.anchor]
        else:
            chosen = list(combinations(sorted(modalities), 2))
        present = [(a, b) for a, b in chosen if a in modalities and b in modalities]
        return [(a, b, self.cfg.pair_weights.get(f"{a}-{b}", 1.0)) for a, b in present]

    def forward(self, embeddings: Embeddings, logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None,
                negatives: Optional[Embeddings] = None) -> Dict[str, torch.Tensor]:
        pairs = self.pairs(list(embeddings))
        if not pairs:
            raise ValueError(f"loss {self.cfg.name!r} found no modality pair among {sorted(embeddings)}")
        gather = dist.all_gather_with_grad if self.gathers else (lambda local: local)
        gathered = {m: gather(e) for m, e in embeddings.items()}
        gathered_negatives = {m: dist.all_gather_with_grad(n).flatten(0, 1)  # (W*B, H, D) -> (W*B*H, D)
                              for m, n in (negatives or {}).items()}
        parts: Dict[str, torch.Tensor] = {}
        for a, b, _ in pairs:
            parts[f"{a}-{b}"] = self.pair_loss(
                embeddings[a], embeddings[b], gathered[a], gathered[b], logit_scale, logit_bias,
                gathered_negatives.get(a), gathered_negatives.get(b))
        total = sum(weight * parts[f"{a}-{b}"] for a, b, weight in pairs)
        return {"loss": total, **parts}  # type: ignore[dict-item]

    def pair_loss(self, local_a: torch.Tensor, local_b: torch.Tensor, global_a: torch.Tensor, global_b: torch.Tensor,
                  logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor],
                  negatives_a: Optional[torch.Tensor], negatives_b: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def local_positions(local: torch.Tensor) -> torch.Tensor:
    """Column index of each local row's positive among the gathered rows: rank * B + i."""
    batch = local.shape[0]
    return torch.arange(batch, device=local.device) + dist.rank() * batch


def single_view(tensor: torch.Tensor, loss_name: str) -> torch.Tensor:
    if tensor.ndim == 3:
        if tensor.shape[1] != 1:
            raise ValueError(f"loss {loss_name!r} takes one view per sample; use 'multi_positive' for "
                             f"{tensor.shape[1]} views")
        return tensor[:, 0]
    return tensor


class RowwiseLoss(ContrastiveLoss):
    """Losses defined per anchor row over its candidates, symmetrised over the two directions."""

    def pair_loss(self, local_a, local_b, global_a, global_b, logit_scale, logit_bias, negatives_a, negatives_b):
        local_a, local_b = single_view(local_a, self.cfg.name), single_view(local_b, self.cfg.name)
        global_a, global_b = single_view(global_a, self.cfg.name), single_view(global_b, self.cfg.name)
        positive = local_positions(local_a)
        # Explicit hard negatives of one modality are extra candidates for the other modality's anchors.
        candidates_b = global_b if negatives_b is None else torch.cat([global_b, negatives_b])  # (C + N, D)
        candidates_a = global_a if negatives_a is None else torch.cat([global_a, negatives_a])
        a_to_b = self.row_losses(local_a, candidates_b, logit_scale, positive)  # (B,)
        b_to_a = self.row_losses(local_b, candidates_a, logit_scale, positive)  # (B,)
        return (a_to_b.mean() + b_to_a.mean()) / 2

    def row_losses(self, anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                   positive: torch.Tensor) -> torch.Tensor:
        """(R,) loss of each anchor row; `positive` (R,) indexes its positive among `candidates`."""
        raise NotImplementedError


def positive_logits(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, positive[:, None])[:, 0]  # (R, C) -> (R,)


def without_positive(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The logits with each row's positive set to -inf, so it drops out of sums of exponentials."""
    return logits.scatter(1, positive[:, None], float("-inf"))  # (R, C)
