"""Symile (Saporta et al., 2024): one contrastive loss over three or more modalities at once.

The score of a tuple is the multilinear inner product MIP(x, y, z, ...) = sum_d x[d] y[d] z[d] ...,
so it captures dependence among all modalities jointly, not only pairwise. Each modality in turn is
the anchor: anchor row i is contrasted, by cross-entropy over scale * MIP, between its positive tuple
(y_i, z_i, ...) of the other modalities and negatives drawn from the product of those modalities'
marginals; the loss is the mean over anchors. The negatives (`loss.symile_negatives`), as the authors
define them:
- "n" (O(N), their default): each non-anchor modality's rows are shuffled independently, and candidate
  j is the tuple of the shuffled rows at j; the positive tuple replaces candidate i of row i;
- "n_squared" (O(N^(M-1))): every combination of the non-anchor modalities' rows.

Across processes every candidate set is formed from the gathered (global) batch, N = W * B rows, and
each process scores its own anchors against it. The O(N) shuffles are permutations of the N global
rows drawn from a generator seeded with the step's seed (for each anchor in sorted order, one
permutation per other modality in sorted order), so every process draws the same ones: the loss and
gradients equal one process's on the concatenated batch.
(Pairwise sums and ImageBind's anchor modality are the `pairs`/`anchor` settings of every pairwise loss.)
"""

from __future__ import annotations

from functools import reduce
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses.base import (
    ContrastiveLoss,
    LossInputs,
    gather_all,
    global_batch,
    local_positions,
    require_negatives,
    single_view,
)
from mmcl.losses.registry import LOSSES


def product(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return reduce(torch.mul, tensors)  # elementwise: (N, D) each -> (N, D)


def every_combination(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, D) each -> (N^k, D): row (j1, ..., jk) in row-major order holds t1[j1] * ... * tk[jk]."""
    combined = tensors[0]
    for tensor in tensors[1:]:
        combined = (combined[:, None, :] * tensor[None, :, :]).flatten(0, 1)  # (P, 1, D) x (1, N, D) -> (P*N, D)
    return combined


@LOSSES.register("symile")
class Symile(ContrastiveLoss):
    takes_missing = False  # every sample must hold every modality

    @classmethod
    def check(cls, cfg: LossConfig, modalities: Sequence[str], optional: Sequence[str], key: str) -> None:
        super().check(cfg, modalities, optional, key)
        if len(modalities) < 3:
            raise ConfigError(f"config key '{key}.name': symile needs three or more towers, got {len(modalities)}")

    def score(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        modalities = sorted(inputs.embeddings)
        if len(modalities) < 3:
            raise ConfigError(f"symile needs three or more modalities, got {modalities}")
        if inputs.negatives:
            raise ConfigError("symile takes no explicit hard negatives")
        if not all(bool(rows.all()) for rows in inputs.present.values()):
            raise ConfigError("symile cannot score batches with missing modalities")
        embeddings, logit_scale, seed = inputs.embeddings, inputs.logit_scale, inputs.seed
        require_negatives("symile", global_batch(embeddings), [None])
        local = {m: single_view(embeddings[m], "symile") for m in modalities}
        gathered, _ = gather_all(local, {})  # modality -> (N, D), one collective for all
        rows = local_positions(local[modalities[0]])  # (B,): each local sample's global index
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
        parts = {}
        for anchor in modalities:
            others = [m for m in modalities if m != anchor]
            if self.cfg.symile_negatives == "n":
                logits = self._shuffled_logits(local, gathered, anchor, others, rows, generator)  # (B, N)
                labels = rows
            else:
                candidates = every_combination([gathered[m] for m in others])  # (N^(M-1), D)
                logits = local[anchor] @ candidates.T  # (B, D) x (D, N^(M-1)) -> (B, N^(M-1))
                count = gathered[anchor].shape[0]
                labels = rows * sum(count**k for k in range(len(others)))  # the column of (i, i, ..., i)
            parts[f"symile-{anchor}"] = F.cross_entropy(logit_scale * logits, labels)
        return {"loss": torch.stack(list(parts.values())).mean(), **parts}

    @staticmethod
    def _shuffled_logits(
        local: Dict[str, torch.Tensor],
        gathered: Dict[str, torch.Tensor],
        anchor: str,
        others: List[str],
        rows: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """MIPs of the local anchors with N shuffled tuples, the positive tuple at each row's own column."""
        count = gathered[anchor].shape[0]
        shuffled = [gathered[m][torch.randperm(count, generator=generator).to(rows.device)] for m in others]
        logits = local[anchor] @ product(shuffled).T  # (B, D) x (D, N) -> (B, N)
        positive = (local[anchor] * product([local[m] for m in others])).sum(dim=1)  # (B,): MIP(x_i, y_i, ...)
        return logits.scatter(1, rows[:, None], positive[:, None])  # (B, N)
