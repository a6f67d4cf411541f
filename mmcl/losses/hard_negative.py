"""Hard-negative losses: HCL (Robinson et al., 2021) and HN-NCE (Radenovic et al., 2023, DiHT).

Both reweight each anchor's negatives by exp(beta * logit), beta >= 0, normalised to mean 1 over the
negatives, so negatives that look like the positive count more. Everything is computed in log space:
logits reach 100 and their exponentials overflow float32. HCL's floor on the negative term, N e^{-1/t},
uses the learnt temperature (the authors' is fixed), so its gradient reaches the logit scale when the
floor is active.
"""

from __future__ import annotations

import math

import torch

from mmcl.losses.base import RowwiseLoss, only, positive_logits
from mmcl.losses.registry import LOSSES


def log_reweighted_negatives(logits: torch.Tensor, negatives: torch.Tensor, beta: float) -> torch.Tensor:
    """log of sum_j w_j exp(n_j) over the negatives n_j of each row (the columns `negatives` marks),
    with w_j = N exp(beta n_j) / sum_k exp(beta n_k); (R, C) -> (R,)."""
    log_count = negatives.sum(dim=1).double().log().to(logits.dtype)  # (R,): log N, rounded once
    # Scale first, then drop the other columns: beta may be 0, and 0 * -inf is nan.
    return (
        log_count
        + only((1 + beta) * logits, negatives).logsumexp(dim=1)
        - only(beta * logits, negatives).logsumexp(dim=1)
    )


@LOSSES.register("hn_nce")
class HardNegativeNCE(RowwiseLoss):
    """HN-NCE: -log( e^p / (alpha e^p + sum_j w_j e^n_j) ), both directions."""

    def row_losses(self, logits, positive, negatives, logit_scale):
        pos = positive_logits(logits, positive)  # (R,)
        log_negatives = log_reweighted_negatives(logits, negatives, self.cfg.beta)  # (R,)
        log_alpha = math.log(self.cfg.alpha) if self.cfg.alpha > 0 else float("-inf")
        return torch.logaddexp(log_alpha + pos, log_negatives) - pos


@LOSSES.register("hcl")
class HardContrastive(RowwiseLoss):
    """HCL: the debiased, hardness-reweighted negative term
    Ng = max((sum_j w_j e^n_j - tau+ N e^p) / (1 - tau+), N e^{-scale}); loss = -log(e^p / (e^p + Ng))."""

    same_modality_negatives = True

    def row_losses(self, logits, positive, negatives, logit_scale):
        count = negatives.sum(dim=1).to(logits.dtype)  # (R,): N
        pos = positive_logits(logits, positive)  # (R,)
        # Work relative to each row's largest candidate logit so no exponential overflows or underflows.
        shift = only(logits, negatives.scatter(1, positive[:, None], True)).max(dim=1).values.detach()  # (R,)
        weighted = torch.exp(log_reweighted_negatives(logits, negatives, self.cfg.beta) - shift)
        tau_plus = self.cfg.tau_plus
        debiased = (weighted - tau_plus * count * torch.exp(pos - shift)) / (1 - tau_plus)
        # The floor is the smallest value the negative term can take: every similarity at -1.
        floor = count * torch.exp(-logit_scale - shift)
        negative_term = torch.maximum(debiased, floor)
        return torch.log(torch.exp(pos - shift) + negative_term) + shift - pos
