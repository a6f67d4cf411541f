"""Symile (Saporta et al., 2024): one contrastive loss over three or more modalities at once.

The score of a tuple is the multilinear inner product MIP(x1, ..., xM) = sum_d prod_m x_m[d], so it
captures dependence among all modalities jointly, not only pairwise. For each target modality, sample
i's other modalities are held fixed and the target is contrasted against every sample's target in the
(global) batch: cross-entropy over scale * MIP; the loss is the mean over targets.
(Pairwise sums and ImageBind's anchor modality are the `pairs`/`anchor` settings of every pairwise loss.)
"""

from __future__ import annotations

from functools import reduce

import torch
import torch.nn.functional as F

from mmcl import dist
from mmcl.losses.base import ContrastiveLoss, local_positions, single_view
from mmcl.losses.registry import LOSSES


@LOSSES.register("symile")
class Symile(ContrastiveLoss):
    takes_missing = False  # every sample must hold every modality

    def forward(self, embeddings, logit_scale, logit_bias=None, negatives=None, present=None):
        modalities = sorted(embeddings)
        if len(modalities) < 3:
            raise ValueError(f"symile needs three or more modalities, got {modalities}")
        if negatives:
            raise ValueError("symile takes no explicit hard negatives")
        if present and not all(bool(rows.all()) for rows in present.values()):
            raise ValueError("symile cannot score batches with missing modalities")
        local = {m: single_view(e, "symile") for m, e in embeddings.items()}
        parts = {}
        for target in modalities:
            others = reduce(torch.mul, [local[m] for m in modalities if m != target])  # (B, D), elementwise product
            candidates = dist.all_gather_with_grad(local[target])  # (W*B, D)
            logits = logit_scale * others @ candidates.T  # (B, D) x (D, W*B) -> (B, W*B): MIP of each tuple
            parts[f"symile-{target}"] = F.cross_entropy(logits, local_positions(others))
        return {"loss": torch.stack(list(parts.values())).mean(), **parts}
