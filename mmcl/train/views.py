"""K rows per sample through a step: K captions (data.captions=all), K augmented views (data.views).

A modality fed K views per sample arrives as (B, K, ...). Its rows are flattened to (B*K, ...) before
the towers, so the towers embed them as any rows (and the gradient cache chunks, caches and replays
them, RNG states included); a wrapper around the loss function reshapes their embeddings back to
(B, K, D) just before the loss. Nothing else in the step knows about them. Attach the views before the
hard negatives (`HardNegatives.attach`), whose rows then follow the B*K views' rows.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from mmcl.config import Config
from mmcl.data.augment import check_views_config
from mmcl.data.captions import check_captions_config
from mmcl.errors import ConfigError
from mmcl.losses import LOSSES
from mmcl.train.gradcache import LossFn

Tensors = Mapping[str, torch.Tensor]


def check_views(cfg: Config, kinds: Mapping[str, str]) -> None:
    """A ConfigError naming the key for captions or views the towers cannot read (`kinds`: each fed
    tower's modality -> what it reads), or several rows per sample the loss cannot score."""
    check_captions_config(cfg.data, kinds)
    check_views_config(cfg.data, kinds)
    if cfg.data.captions == "all":
        _check_scorable(cfg, "data.captions", f"'all' makes {cfg.data.captions_per_sample} positive captions")
    several = {m: k for m, k in cfg.data.views.items() if k > 1}
    if several:
        _check_scorable(cfg, "data.views", f"{several} makes several positive views")
    several_captions = cfg.data.captions == "all" and cfg.data.captions_per_sample > 1
    if cfg.loss.view_weight and not several and not several_captions:
        raise ConfigError(
            "config key 'loss.view_weight': no modality has several rows per sample to contrast with each "
            "other (data.views, or data.captions=all with data.captions_per_sample above 1)"
        )


def _check_scorable(cfg: Config, key: str, what: str) -> None:
    """Several rows per sample need a loss that scores them as positives, and no teacher."""
    if not LOSSES.get(cfg.loss.name).takes_views:
        takers = sorted(name for name in LOSSES.names() if LOSSES.get(name).takes_views)
        raise ConfigError(
            f"config key '{key}': {what} per sample, but loss {cfg.loss.name!r} (loss.name) takes one; "
            f"these take several: {', '.join(takers)}"
        )
    if cfg.loss.distill_from:  # the teacher embeds the batch's inputs as they come, one row per sample
        raise ConfigError(f"config key '{key}': several rows per sample cannot be combined with loss.distill_from")


def added_rows(*rows: Mapping[str, int]) -> Dict[str, int]:
    """Modality -> the sum of its extra rows over `rows` (the negatives', the views')."""
    out: Dict[str, int] = {}
    for part in rows:
        for m, count in part.items():
            out[m] = out.get(m, 0) + count
    return out


class Views:
    """Built once from the modalities fed several views (modality -> K); `attach` is the identity
    without any."""

    def __init__(self, views: Mapping[str, int]) -> None:
        self.views = {m: k for m, k in views.items() if k > 1}

    def extra_rows(self, batch_size: int) -> Dict[str, int]:
        """Rows each modality's tower embeds per step beyond the batch's."""
        return {m: batch_size * (k - 1) for m, k in self.views.items()}

    def attach(self, inputs: Tensors, loss_fn: LossFn) -> Tuple[Dict[str, torch.Tensor], LossFn]:
        """The step's inputs with each modality's (B, K, ...) views flattened to rows, and the loss
        function that reshapes their embeddings to (B, K, D)."""
        if not self.views:
            return dict(inputs), loss_fn
        flat = dict(inputs)
        for m, k in self.views.items():
            if inputs[m].shape[1] != k:
                raise ValueError(f"{m}: {inputs[m].shape[1]} views per sample, expected {k}")
            flat[m] = inputs[m].flatten(0, 1)  # (B, K, ...) -> (B*K, ...)

        def with_views(
            embeddings: Tensors, logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None, **extra: Any
        ) -> Dict[str, torch.Tensor]:
            shaped = dict(embeddings)
            for m, k in self.views.items():
                rows = embeddings[m]
                shaped[m] = rows.reshape(rows.shape[0] // k, k, *rows.shape[1:])  # (B*K, D) -> (B, K, D)
            return loss_fn(shaped, logit_scale, logit_bias, **extra)

        return flat, with_views
