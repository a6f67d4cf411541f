"""Hard-negative losses: HCL (Robinson et al., 2021) and HN-NCE (Radenovic et al., 2023, DiHT).

Both reweight each anchor's negatives by exp(beta * logit), normalised to mean 1 over the negatives,
so negatives that look like the positive count more. Everything is computed in log space: logits reach
100 and their exponentials overflow float32.
"""

from __future__ import annotations

import math

import torch

from mmcl.losses.base import RowwiseLoss, positive_logits, without_positive
from mmcl.losses.registry import LOSSES


def log_reweighted_negatives(logits: torch.Tensor, positive: torch.Tensor, beta: float) -> torch.Tensor:
    """log of sum_j w_j exp(n_j) over the negatives n_j of each row (every logit but the positive),
    with w_j = N exp(beta n_j) / sum_k exp(beta n_k); (R, C) -> (R,)."""
    count = logits.shape[1] - 1  # N negatives per row
    # Scale first, then drop the positive: beta may be 0, and 0 * -inf is nan.
    return (math.log(count) + without_positive((1 + beta) * logits, positive).logsumexp(dim=1)
            - without_positive(beta * logits, positive).logsumexp(dim=1))


@LOSSES.register("hn_nce")
class HardNegativeNCE(RowwiseLoss):
    """HN-NCE: -log( e^p / (alpha e^p + sum_j w_j e^n_j) ), both directions."""

    def row_losses(self, anchors, candidates, logit_scale, positive):
        logits = logit_scale * anchors @ candidates.T  # (R, C)
        pos = positive_logits(logits, positive)  # (R,)
        log_negatives = log_reweighted_negatives(logits, positive, self.cfg.beta)  # (R,)
        log_alpha = math.log(self.cfg.alpha) if self.cfg.alpha > 0 else float("-inf")
        return torch.logaddexp(log_alpha + pos, log_negatives) - pos


@LOSSES.register("hcl")
class HardContrastive(RowwiseLoss):
    """HCL: the debiased, hardness-reweighted negative term
    Ng = max((sum_j w_j e^n_j - tau+ N e^p) / (1 - tau+), N e^{-scale}); loss = -log(e^p / (e^p + Ng))."""

    def row_losses(self, anchors, candidates, logit_scale, positive):
        logits = logit_scale * anchors @ candidates.T  # (R, C)
        count = logits.shape[1] - 1
        pos = positive_logits(logits, positive)  # (R,)
        # Work relative to each row's largest logit so no exponential overflows.
        shift = logits.max(dim=1).values.detach()  # (R,)
        negatives = torch.exp(log_reweighted_negatives(logits, positive, self.cfg.beta) - shift)
        tau_plus = self.cfg.tau_plus
        debiased = (negatives - tau_plus * count * torch.exp(pos - shift)) / (1 - tau_plus)
        # The floor is the smallest value the negative term can take: every similarity at -1.
        floor = count * torch.exp(-logit_scale - shift)
        negative_term = torch.maximum(debiased, floor)
        return torch.log(torch.exp(pos - shift) + negative_term) + shift - pos
