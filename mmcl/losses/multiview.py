"""Several positives per anchor: K views or K captions per sample, in one loss.

Embeddings may be (B, K, D). Every view of sample i in one modality is a positive for every view of
sample i in the other (a SupCon-style positive mask over sample ids); all other candidates are
negatives. Two ways to aggregate an anchor's positives:
- "geometric": mean over positives of -log softmax (SupCon's L_out; the geometric mean of likelihoods);
- "arithmetic": -log of the mean positive likelihood (Poly-View's arithmetic aggregation, MIL-NCE).
With K = 1 both equal InfoNCE.

With loss.view_weight > 0, a modality's K views are also positives of each other (a SLIP-style
image-image term beside CLIP's, here in the shared embedding space): each view is an anchor against
every other view of that modality, its own sample's K - 1 other views its positives, aggregated the
same way, at the fixed loss.view_temperature. With geometric aggregation this is SupCon's L_out over
the views; at K = 2 it is SimCLR's NT-Xent.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmcl.losses.base import ContrastiveLoss, PairInputs
from mmcl.losses.registry import LOSSES


def _views(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings if embeddings.ndim == 3 else embeddings[:, None]  # (B, D) -> (B, 1, D)


def _flat_with_ids(embeddings: torch.Tensor, sample_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    views = _views(embeddings)  # (B, K, D)
    ids = sample_ids.repeat_interleave(views.shape[1])  # (B*K,)
    return views.flatten(0, 1), ids  # (B*K, D), (B*K,)


@LOSSES.register("multi_positive")
class MultiPositive(ContrastiveLoss):
    takes_negatives = True
    takes_views = True

    def pair_loss(self, pair: PairInputs) -> torch.Tensor:
        # Sample ids: a local sample's id is its position among the global rows.
        anchors_a, ids_a = _flat_with_ids(pair.local_a, pair.positive)
        anchors_b, ids_b = _flat_with_ids(pair.local_b, pair.positive)
        global_ids = torch.arange(pair.global_a.shape[0], device=pair.global_a.device)
        candidates_a, cand_ids_a = _with_negatives(*_flat_with_ids(pair.global_a, global_ids), pair.negatives_a)
        candidates_b, cand_ids_b = _with_negatives(*_flat_with_ids(pair.global_b, global_ids), pair.negatives_b)
        a_to_b = self.row_losses(anchors_a, ids_a, candidates_b, cand_ids_b, pair.logit_scale)
        b_to_a = self.row_losses(anchors_b, ids_b, candidates_a, cand_ids_a, pair.logit_scale)
        return (a_to_b.mean() + b_to_a.mean()) / 2

    def views_loss(self, pair: PairInputs) -> torch.Tensor:
        anchors, ids = _flat_with_ids(pair.local_a, pair.positive)  # (R*K, D), (R*K,)
        global_ids = torch.arange(pair.global_a.shape[0], device=pair.global_a.device)
        candidates, cand_ids = _with_negatives(*_flat_with_ids(pair.global_a, global_ids), pair.negatives_a)
        views = pair.local_a.shape[1]
        # Each anchor's own column among the candidates: view k of global sample s is row s*K + k.
        own = (pair.positive[:, None] * views + torch.arange(views, device=ids.device)).flatten()  # (R*K,)
        scale = torch.tensor(1.0 / self.cfg.view_temperature, dtype=anchors.dtype, device=anchors.device)
        return self.row_losses(anchors, ids, candidates, cand_ids, scale, own).mean()

    def row_losses(
        self,
        anchors: torch.Tensor,
        anchor_ids: torch.Tensor,
        candidates: torch.Tensor,
        candidate_ids: torch.Tensor,
        logit_scale: torch.Tensor,
        own: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(R,) loss of each anchor row; `own` (R,): the anchor's own column, left out of its candidates."""
        logits = logit_scale * anchors @ candidates.T  # (R, D) x (D, C) -> (R, C)
        positive = anchor_ids[:, None] == candidate_ids[None, :]  # (R, C)
        if own is not None:
            logits = logits.scatter(1, own[:, None], float("-inf"))
            positive = positive.scatter(1, own[:, None], False)
        count = positive.sum(dim=1)  # (R,)
        log_z = logits.logsumexp(dim=1)  # (R,)
        if self.cfg.positive_aggregation == "geometric":
            return log_z - logits.masked_fill(~positive, 0.0).sum(dim=1) / count
        positive_lse = logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)  # (R,)
        return log_z - positive_lse + torch.log(count.to(logits.dtype))


def _with_negatives(
    candidates: torch.Tensor, ids: torch.Tensor, negatives: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Explicit negatives appended as candidates that match no sample id."""
    if negatives is None:
        return candidates, ids
    return torch.cat([candidates, negatives]), torch.cat([ids, ids.new_full((negatives.shape[0],), -1)])
