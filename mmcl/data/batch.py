"""The typed unit the data stream hands to training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch


@dataclass
class Batch:
    inputs: Dict[str, torch.Tensor]  # modality -> stacked tensor, first dim = batch
    keys: List[str]  # "<shard url>#<sample key>", in batch order
    skipped: int = 0  # samples dropped as unreadable by this worker since its previous batch
    present: Dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (B,) bool: not a placeholder
    # A ragged modality (several rows per sample): modality -> (B,) rows of each sample, in order.
    counts: Dict[str, torch.Tensor] = field(default_factory=dict)
    sources: List[int] = field(default_factory=list)  # each sample's training source (index in the config)
    # Explicit hard negatives (data.negatives): modality -> (B, H, ...) preprocessed, H per sample.
    negatives: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)
