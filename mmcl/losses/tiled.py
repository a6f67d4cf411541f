"""Memory-lean InfoNCE: the log-sum-exp over candidates computed tile by tile (as Inf-CL does).

The plain loss materialises the (B, B) logits and their softmax, so memory grows with B^2. Here only a
(tile, C) block of logits exists at a time: the forward keeps just the per-row (and per-column)
log-sum-exp, and the backward recomputes each block to form its softmax gradient. Memory is linear in
the batch for a fixed tile; the cost is one extra matrix product (the recomputation).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmcl import dist
from mmcl.losses.base import PairInputs, RowwiseLoss, single_view
from mmcl.losses.registry import LOSSES


class _TiledLogSumExp(torch.autograd.Function):
    """logits = scale * anchors @ candidates.T, never stored whole; returns its row LSE (R,) and,
    when asked, its column LSE (C,) (accumulated across row tiles with a running maximum)."""

    @staticmethod
    def forward(
        ctx, anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, tile: int, with_columns: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        rows, cols = anchors.shape[0], candidates.shape[0]
        row_lse = anchors.new_empty(rows)
        col_max = anchors.new_full((cols,), float("-inf"))
        col_sum = anchors.new_zeros(cols)
        for start in range(0, rows, tile):
            logits = scale * anchors[start : start + tile] @ candidates.T  # (T, D) x (D, C) -> (T, C)
            row_lse[start : start + tile] = logits.logsumexp(dim=1)
            if with_columns:
                new_max = torch.maximum(col_max, logits.max(dim=0).values)  # (C,)
                col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(dim=0)
                col_max = new_max
        col_lse = col_max + col_sum.log() if with_columns else col_sum
        ctx.tile, ctx.with_columns = tile, with_columns
        ctx.save_for_backward(anchors, candidates, scale, row_lse, col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor, grad_col: Optional[torch.Tensor]):
        anchors, candidates, scale, row_lse, col_lse = ctx.saved_tensors
        grad_anchors = torch.empty_like(anchors)
        grad_candidates = torch.zeros_like(candidates)
        grad_scale = torch.zeros_like(scale)
        tile = ctx.tile
        for start in range(0, anchors.shape[0], tile):
            block = anchors[start : start + tile]  # (T, D)
            logits = scale * block @ candidates.T  # (T, C), recomputed
            # d LSE_row / d logits = row softmax; d LSE_col / d logits = column softmax.
            grad_logits = torch.exp(logits - row_lse[start : start + tile, None]) * grad_row[start : start + tile, None]
            if ctx.with_columns and grad_col is not None:
                grad_logits += torch.exp(logits - col_lse[None, :]) * grad_col[None, :]
            grad_anchors[start : start + tile] = scale * grad_logits @ candidates  # (T, C) x (C, D) -> (T, D)
            grad_candidates += scale * grad_logits.T @ block  # (C, T) x (T, D) -> (C, D)
            grad_scale += (grad_logits * logits).sum() / scale  # d logits / d scale = logits / scale
        return grad_anchors, grad_candidates, grad_scale, None, None


def tiled_logsumexp(
    anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, tile: int, with_columns: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _TiledLogSumExp.apply(anchors, candidates, scale, tile, with_columns)


@LOSSES.register("infonce_tiled")
class TiledInfoNCE(RowwiseLoss):
    """Same values and gradients as `infonce` (label smoothing included), in memory linear in the batch.

    Label smoothing eps needs no logits matrix: CE_eps = LSE - (1 - eps) * positive - eps * mean logit,
    and the mean logit of a row is scale * anchor . mean(candidates).
    """

    def direction(self, anchors, others, other_negatives, own, positive, logit_scale):
        candidates = others if other_negatives is None else torch.cat([others, other_negatives])  # (C, D)
        row_lse, _ = tiled_logsumexp(anchors, candidates, logit_scale, self.cfg.chunk_size)
        return self._smoothed(row_lse, anchors, candidates, logit_scale, candidates[positive])

    def _smoothed(self, lse, anchors, candidates, logit_scale, positives):
        eps = self.cfg.label_smoothing
        pos = logit_scale * (anchors * positives).sum(dim=1)  # (R,)
        loss = lse - (1 - eps) * pos
        if eps:
            loss = loss - eps * logit_scale * anchors @ candidates.mean(dim=0)  # (R, D) x (D,) -> (R,)
        return loss

    def pair_loss(self, pair: PairInputs) -> torch.Tensor:
        if dist.world_size() > 1 or pair.negatives_a is not None or pair.negatives_b is not None:
            return super().pair_loss(pair)
        # One process, square logits: one pass gives both directions (rows: a->b, columns: b->a).
        a, b = single_view(pair.local_a, self.cfg.name), single_view(pair.local_b, self.cfg.name)
        row_lse, col_lse = tiled_logsumexp(a, b, pair.logit_scale, self.cfg.chunk_size, with_columns=True)
        a_to_b = self._smoothed(row_lse, a, b, pair.logit_scale, b)
        b_to_a = self._smoothed(col_lse, b, a, pair.logit_scale, a)
        return (a_to_b.mean() + b_to_a.mean()) / 2
