"""Several captions of one sample (data.captions, data.captions_per_sample).

A text field may hold a sample's captions one per line, or a JSON list of strings under a json key
(`json:captions`); decoding them as the "captions" kind gives the list. `one` draws one caption per read
of the sample from torch's RNG, which the stream seeds per (seed, epoch, rank, worker) as it does for the
augmentations, so a resumed stream draws alike; `all` keeps the first K as K views of the sample
(`InputSpec.views`): preprocessing returns (K, L) and the batch (B, K, L).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable, Dict, List, Mapping

import torch

from mmcl.config import DataConfig
from mmcl.data.negatives import repeated
from mmcl.data.pipeline import InputSpec
from mmcl.errors import ConfigError

Preprocess = Callable[[object], torch.Tensor]


def first_captions(captions: List[str], per_sample: int) -> List[str]:
    """The first `per_sample` captions; fewer are repeated in order up to `per_sample`, so every sample
    contributes the same K rows (the gather across processes needs equal shapes)."""
    return repeated(captions, per_sample)


def draw_caption(captions: List[str]) -> str:
    """One caption, drawn from torch's RNG: the stream's data seed makes the draw reproducible."""
    return captions[int(torch.randint(len(captions), ()))]


def _preprocess_one(preprocess: Preprocess, captions: object) -> torch.Tensor:
    return preprocess(draw_caption(list(captions)))  # type: ignore[call-overload]


def _preprocess_all(preprocess: Preprocess, per_sample: int, captions: object) -> torch.Tensor:
    rows = [preprocess(text) for text in first_captions(list(captions), per_sample)]  # type: ignore[call-overload]
    return torch.stack(rows)  # K x (L,) -> (K, L)


def caption_views(cfg: DataConfig, kinds: Mapping[str, str]) -> Dict[str, int]:
    """Modality -> K for the towers fed K captions per sample (data.captions=all); {} otherwise.
    `kinds`: each fed tower's modality -> what it reads."""
    if cfg.captions != "all":
        return {}
    return {m: cfg.captions_per_sample for m, kind in kinds.items() if kind == "text"}


def caption_inputs(cfg: DataConfig, inputs: Mapping[str, InputSpec]) -> Dict[str, InputSpec]:
    """The stream's inputs with every text input read as data.captions says (as they are for `text`)."""
    if cfg.captions == "text":
        return dict(inputs)
    out = dict(inputs)
    for m, spec in inputs.items():
        if spec.kind != "text" or spec.negatives_of or spec.ragged:
            continue
        if cfg.captions == "one":
            out[m] = replace(spec, kind="captions", preprocess=partial(_preprocess_one, spec.preprocess))
        else:
            per_sample = cfg.captions_per_sample
            preprocess = partial(_preprocess_all, spec.preprocess, per_sample)
            out[m] = replace(spec, kind="captions", preprocess=preprocess, views=per_sample)
    return out


def check_captions_config(cfg: DataConfig, kinds: Mapping[str, str], key: str = "data") -> None:
    """A ConfigError naming the key when captions are asked of towers none of which reads text."""
    if cfg.captions != "text" and "text" not in kinds.values():
        raise ConfigError(
            f"config key '{key}.captions': {cfg.captions!r} reads captions, but no fed tower reads text "
            f"({', '.join(f'{m}: {k}' for m, k in sorted(kinds.items()))})"
        )
    if cfg.captions != "all" and cfg.captions_per_sample != 1:
        raise ConfigError(
            f"config key '{key}.captions_per_sample': {cfg.captions_per_sample} captions per sample are "
            f"read with data.captions=all only (it is {cfg.captions!r})"
        )
