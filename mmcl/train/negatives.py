"""Explicit hard negatives through a step: embedded by their modality's tower, handed to the loss.

The B x H negative rows of a modality are appended to its B inputs (or B*K rows of K views), so the
towers embed them in the same forward (and the gradient cache chunks, caches and replays them, RNG
states included, like any other row); a wrapper around the loss function splits the embeddings back
into the positives and the (B, H, D) negatives just before the loss. Nothing else in the step knows
about them.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from mmcl.config import Config
from mmcl.data.negatives import check_negatives_config
from mmcl.errors import ConfigError
from mmcl.losses import LOSSES
from mmcl.train.gradcache import LossFn

Tensors = Mapping[str, torch.Tensor]


def check_negatives(cfg: Config, kinds: Mapping[str, str]) -> None:
    """A ConfigError naming the key for negatives the towers cannot read (`kinds`: each fed tower's
    modality -> what it reads) or the loss cannot score."""
    check_negatives_config(cfg.data, kinds)
    loss = LOSSES.get(cfg.loss.name)
    if cfg.data.negatives and not loss.takes_negatives:
        takers = sorted(name for name in LOSSES.names() if LOSSES.get(name).takes_negatives)
        raise ConfigError(
            f"config key 'data.negatives': loss {cfg.loss.name!r} (loss.name) takes no explicit hard "
            f"negatives; these do: {', '.join(takers)}"
        )


def split_negatives(
    embeddings: Tensors, positive_rows: Mapping[str, int], per_sample: int
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(modality -> positives, modality -> (B, H, D) negatives) from embeddings whose modalities in
    `positive_rows` hold that many positive rows (B, or B*K with K views per sample) followed by each
    sample's H negatives in turn."""
    positives, negatives = dict(embeddings), {}
    for m, count in positive_rows.items():
        rows = embeddings[m]
        positives[m] = rows[:count]  # (B, D), or (B*K, D)
        negatives[m] = rows[count:].reshape(-1, per_sample, *rows.shape[1:])  # (B*H, D) -> (B, H, D)
    return positives, negatives


class HardNegatives:
    """Built once from data.negatives; `attach` is the identity when none are configured."""

    def __init__(self, modalities: Sequence[str], per_sample: int) -> None:
        self.modalities = list(modalities)
        self.per_sample = per_sample

    def extra_rows(self, batch_size: int) -> Dict[str, int]:
        """Rows each modality's tower embeds per step beyond the batch's."""
        return {m: batch_size * self.per_sample for m in self.modalities}

    def attach(self, inputs: Tensors, negatives: Tensors, loss_fn: LossFn) -> Tuple[Dict[str, torch.Tensor], LossFn]:
        """The step's inputs with each modality's negative rows appended, and the loss function that
        splits their embeddings off again and passes them as `negatives=`."""
        if not self.modalities:
            return dict(inputs), loss_fn
        extended = dict(inputs)
        positive_rows = {m: inputs[m].shape[0] for m in self.modalities}  # B, or B*K rows of K views
        for m in self.modalities:
            rows = negatives[m].to(inputs[m].device, non_blocking=True).flatten(0, 1)  # (B, H, ...) -> (B*H, ...)
            extended[m] = torch.cat([inputs[m], rows])  # (B + B*H, ...)

        def with_negatives(
            embeddings: Tensors, logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None
        ) -> Dict[str, torch.Tensor]:
            positives, hard = split_negatives(embeddings, positive_rows, self.per_sample)
            return loss_fn(positives, logit_scale, logit_bias, negatives=hard)

        return extended, with_negatives
