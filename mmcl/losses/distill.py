"""Distillation from a frozen teacher: open_clip's DistillClipLoss (and DiHT's concept distillation)
as a term added to any contrastive loss.

For each modality pair (a, b) the loss scores, and each direction (a -> b, b -> a), the student's and
the teacher's logits of the same anchors over the same candidates give a soft cross-entropy:
    distill(a -> b) = mean over anchors i of  -sum_j softmax(t_logits)[i, j] * log_softmax(s_logits)[i, j]
with s_logits = student scale * s_a @ s_b.T and t_logits = teacher scale * t_a @ t_b.T, each model with
its own learnt scale (open_clip passes the teacher's). A pair's term is the mean of its two directions,
the pairs are summed with the loss's pair weights, and the loss becomes
    contrastive + loss.distill_weight * distill.
The teacher's targets carry no gradient; a logit bias (SigLIP's) shifts a whole row and leaves its
softmax unchanged, so it has no place here.

Distributed: like the contrastive losses, each process scores its own anchor rows against every
process's candidates (student and teacher embeddings gathered in one collective, the student's with
gradients): the per-process value is its share, and the mean over processes is the single-process
term on the concatenated batch.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mmcl.config import LossConfig, pair_name
from mmcl.losses.base import ContrastiveLoss, Embeddings, gather_all, single_view
from mmcl.models import Encoded

TEACHER = "teacher:"  # the teacher's embeddings travel in the gather under these names


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(R,): each row's cross-entropy between the teacher's softmax and the student's log-softmax."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)  # (R, C) -> (R,)


def direction(
    student: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The mean soft cross-entropy of one direction; each of student and teacher is (local anchors
    (R, D), every process's candidates (C, D), logit scale), D the model's own width."""
    s_anchors, s_candidates, s_scale = student
    t_anchors, t_candidates, t_scale = teacher
    student_logits = s_scale * s_anchors @ s_candidates.T  # (R, D) x (D, C) -> (R, C)
    teacher_logits = t_scale * t_anchors @ t_candidates.T  # (R, Dt) x (Dt, C) -> (R, C)
    return soft_cross_entropy(student_logits, teacher_logits).mean()


class DistillationLoss(nn.Module):
    """A built contrastive loss plus the distillation term; called as the loss it wraps, with the
    teacher's `Encoded` of the same batch (this process's rows) as `teacher`."""

    def __init__(self, contrastive: ContrastiveLoss, weight: float) -> None:
        super().__init__()
        self.contrastive = contrastive
        self.weight = weight

    def forward(
        self,
        embeddings: Embeddings,
        logit_scale: torch.Tensor,
        logit_bias: Optional[torch.Tensor] = None,
        negatives: Optional[Embeddings] = None,
        present: Optional[Mapping[str, torch.Tensor]] = None,
        seed: int = 0,
        teacher: Optional[Encoded] = None,
    ) -> Dict[str, torch.Tensor]:
        """The wrapped loss's parts, "contrastive" (its total), "distill" and "distill_<pair>", and
        "loss" = contrastive + weight * distill."""
        if teacher is None:
            raise ValueError("distillation needs the teacher's embeddings of the batch (teacher=...)")
        out = self.contrastive(embeddings, logit_scale, logit_bias, negatives, present, seed)
        pairs = self.contrastive.pairs(list(embeddings))
        parts = self.pair_terms(pairs, embeddings, logit_scale, teacher)
        distill = sum(weight * parts[pair_name(a, b)] for a, b, weight in pairs)
        return {
            **out,
            "loss": out["loss"] + self.weight * distill,
            "contrastive": out["loss"],
            "distill": distill,
            **{f"distill_{name}": value for name, value in parts.items()},
        }

    def pair_terms(
        self,
        pairs: List[Tuple[str, str, float]],
        embeddings: Embeddings,
        logit_scale: torch.Tensor,
        teacher: Encoded,
    ) -> Dict[str, torch.Tensor]:
        """pair name -> the mean of its two directions' terms, on this process's anchor rows."""
        name = self.contrastive.cfg.name
        used = sorted({m for a, b, _ in pairs for m in (a, b)})
        local = {m: single_view(embeddings[m], name) for m in used}  # modality -> (B, D)
        # The teacher's rows in the student's dtype, so that both travel in one gather (and one backward
        # reduction): modality -> (B, Dt).
        local_teacher = {m: teacher.embeddings[m].detach().to(local[m].dtype) for m in used}
        gathered, _ = gather_all({**local, **{TEACHER + m: t for m, t in local_teacher.items()}}, {})
        t_scale = teacher.logit_scale.detach().to(logit_scale.dtype)
        terms = {}
        for a, b, _ in pairs:
            a_to_b = direction((local[a], gathered[b], logit_scale), (local_teacher[a], gathered[TEACHER + b], t_scale))
            b_to_a = direction((local[b], gathered[a], logit_scale), (local_teacher[b], gathered[TEACHER + a], t_scale))
            terms[pair_name(a, b)] = (a_to_b + b_to_a) / 2
        return terms


def with_distillation(loss: ContrastiveLoss, cfg: LossConfig) -> nn.Module:
    """The loss itself without a teacher (loss.distill_from empty), else the loss plus distillation."""
    return DistillationLoss(loss, cfg.distill_weight) if cfg.distill_from else loss
