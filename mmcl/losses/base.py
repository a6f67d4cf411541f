"""What every contrastive loss shares: the call shape, the choice of modality pairs, the gathering.

Call shape: `loss(embeddings, logit_scale, logit_bias=None, negatives=None) -> {"loss": ..., <pair>: ...}`
- embeddings: modality -> this process's unit-norm rows, (B, D), or (B, K, D) for K views/captions.
- logit_scale: the multiplier (exp of the learnt log-scale); logit_bias: SigLIP's bias, else None.
- negatives: optional modality -> (B, H, D) explicit hard negatives, extra candidates of that modality.
- present: optional modality -> (B,) bool, False where a sample lacks that modality (its row is a
  placeholder). A pair is then scored over the samples that have both, on every process, with the
  same weight per sample as if only those samples had been in the batch.

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
    takes_missing = True  # whether a pair can be scored over a subset of the batch (see `present`)

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
                negatives: Optional[Embeddings] = None,
                present: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        pairs = self.pairs(list(embeddings))
        if not pairs:
            raise ValueError(f"loss {self.cfg.name!r} found no modality pair among {sorted(embeddings)}")
        if self.gathers:
            gathered, gathered_negatives = _gather_all(embeddings, negatives or {})
        else:
            gathered, gathered_negatives = dict(embeddings), {}
            if negatives:
                raise ValueError(f"loss {self.cfg.name!r} takes no explicit hard negatives in this exchange")
        global_present = _gather_present(present) if present else {}
        parts: Dict[str, torch.Tensor] = {}
        for a, b, _ in pairs:
            local = (embeddings[a], embeddings[b], gathered[a], gathered[b])
            extra = (logit_scale, logit_bias, gathered_negatives.get(a), gathered_negatives.get(b))
            both = _both_present(global_present, a, b)
            if both is None:
                parts[f"{a}-{b}"] = self.pair_loss(*local, local_positions(embeddings[a]), *extra)
            else:
                parts[f"{a}-{b}"] = self._subset_pair_loss(*local, both, extra)
        total = sum(weight * parts[f"{a}-{b}"] for a, b, weight in pairs)
        return {"loss": total, **parts}  # type: ignore[dict-item]

    def _subset_pair_loss(self, local_a: torch.Tensor, local_b: torch.Tensor, global_a: torch.Tensor,
                          global_b: torch.Tensor, global_rows: torch.Tensor, extra: tuple) -> torch.Tensor:
        """pair_loss over the samples holding both modalities (`global_rows`, (W*B,) bool, every process's)."""
        if not self.takes_missing:
            raise ValueError(f"loss {self.cfg.name!r} cannot score batches with missing modalities")
        batch = local_a.shape[0]
        local_rows = global_rows[dist.rank() * batch:(dist.rank() + 1) * batch]  # (B,)
        kept, kept_everywhere = int(local_rows.sum()), int(global_rows.sum())
        if kept == 0 or kept_everywhere < 2:  # nothing to score here (a contrast needs a negative); stay in
            # the graph all the same: every process must run the same backward collectives (the gathers').
            return 0.0 * (global_a.sum() + global_b.sum())
        # Each kept local row's positive: its index among the kept rows of the gathered batch.
        positive = (global_rows.cumsum(0) - 1)[local_positions(local_a)][local_rows]
        loss = self.pair_loss(local_a[local_rows], local_b[local_rows], global_a[global_rows], global_b[global_rows],
                              positive, *extra)
        # pair_loss is a mean over this process's kept rows; weight it by their share of all kept rows, so
        # the mean over processes is the mean over every kept row, as on one process.
        return loss * (kept * dist.world_size() / kept_everywhere)

    def pair_loss(self, local_a: torch.Tensor, local_b: torch.Tensor, global_a: torch.Tensor, global_b: torch.Tensor,
                  positive: torch.Tensor, logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor],
                  negatives_a: Optional[torch.Tensor], negatives_b: Optional[torch.Tensor]) -> torch.Tensor:
        """Loss of this process's rows; `positive` (R,) indexes each local row's pair among the global rows."""
        raise NotImplementedError


def _gather_all(embeddings: Embeddings, negatives: Embeddings) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Every process's embeddings and hard negatives, in one differentiable all-gather.

    One collective, so one reduction in backward: with several gathers the autograd engine would be
    free to run their reductions in a different order on processes whose loss graphs differ (as when
    a process holds no sample of some pair), and the collectives would cross.
    Returns modality -> (W*B, ...) embeddings and modality -> (W*B*H, D) negatives.
    """
    if not dist.is_distributed():
        return dict(embeddings), {m: n.flatten(0, 1) for m, n in negatives.items()}
    tensors = [*embeddings.values(), *negatives.values()]
    widths = [t[0].numel() for t in tensors]
    flat = dist.all_gather_with_grad(torch.cat([t.flatten(1) for t in tensors], dim=1))  # (W*B, sum of widths)
    pieces = [piece.reshape(-1, *t.shape[1:]) for piece, t in zip(flat.split(widths, dim=1), tensors)]
    gathered = dict(zip(embeddings, pieces[:len(embeddings)]))
    gathered_negatives = {m: n.flatten(0, 1) for m, n in zip(negatives, pieces[len(embeddings):])}
    return gathered, gathered_negatives


def _gather_present(present: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every process's presence masks, modality -> (W*B,) bool, in one (gradient-free) all-gather."""
    stacked = torch.stack([rows.to(torch.uint8) for rows in present.values()], dim=1)  # (B, M)
    gathered = dist.all_gather_with_grad(stacked).bool()  # (W*B, M)
    return dict(zip(present, gathered.unbind(dim=1)))


def _both_present(global_present: Mapping[str, torch.Tensor], a: str, b: str) -> Optional[torch.Tensor]:
    """(W*B,) bool of the samples (on every process) holding both modalities, or None when all do.
    Decided on the gathered masks, so every process takes the same branch."""
    masks = [global_present[m] for m in (a, b) if m in global_present]
    if not masks:
        return None
    rows = masks[0] & masks[-1]
    return None if bool(rows.all()) else rows


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

    def pair_loss(self, local_a, local_b, global_a, global_b, positive, logit_scale, logit_bias, negatives_a,
                  negatives_b):
        local_a, local_b = single_view(local_a, self.cfg.name), single_view(local_b, self.cfg.name)
        global_a, global_b = single_view(global_a, self.cfg.name), single_view(global_b, self.cfg.name)
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
