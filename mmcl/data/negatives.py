"""Explicit hard negatives read from the shards (data.negatives, data.negatives_per_sample).

A sample's negatives of a modality are a UTF-8 text field holding one negative caption per line (the
layout of CLIP_benchmark's and SugarCrepe's caption files). Each becomes H rows preprocessed by the
modality's own tower preprocessing, stacked as one (H, ...) input that the batch carries apart from
the positives (`Batch.negatives`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Mapping

import torch

from mmcl.config import DataConfig, parse_fields
from mmcl.data.decode import SampleError, check_fields
from mmcl.data.pipeline import InputSpec
from mmcl.errors import ConfigError, DataError


def negative_lines(text: str, per_sample: int) -> List[str]:
    """The first `per_sample` non-blank lines; fewer are repeated in order up to `per_sample`, so every
    sample contributes the same H rows (the gather across processes needs equal shapes). None at all
    makes the sample unusable: it is skipped and counted like any unreadable sample."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SampleError("no negative caption (every line is blank)")
    return [lines[index % len(lines)] for index in range(per_sample)]


def _preprocess_negatives(preprocess: Callable[[object], torch.Tensor], per_sample: int, text: object) -> torch.Tensor:
    rows = [preprocess(line) for line in negative_lines(str(text), per_sample)]
    return torch.stack(rows)  # H x (L,) -> (H, L)


def negative_inputs(
    cfg: DataConfig, preprocess: Mapping[str, Callable[[object], torch.Tensor]]
) -> Dict[str, InputSpec]:
    """The stream's extra inputs, "<modality>.negatives" -> how to read them; {} without data.negatives."""
    return {
        f"{modality}.negatives": InputSpec(
            "text",
            parse_fields(fields),
            partial(_preprocess_negatives, preprocess[modality], cfg.negatives_per_sample),
            negatives_of=modality,
        )
        for modality, fields in cfg.negatives.items()
    }


def check_negatives_config(cfg: DataConfig, kinds: Mapping[str, str], key: str = "data") -> None:
    """A ConfigError naming the key for negatives the towers cannot be fed from (`kinds`: each fed
    tower's modality -> what it reads)."""
    if cfg.negatives and cfg.sources:
        raise ConfigError(f"config key '{key}.negatives': read from data.train only, not from {key}.sources")
    for modality, fields in cfg.negatives.items():
        entry = f"{key}.negatives.{modality}"
        if modality not in kinds:
            raise ConfigError(f"config key '{entry}': {modality!r} is not a fed tower ({', '.join(sorted(kinds))})")
        if modality in cfg.optional_modalities:  # a sample lacking the modality would lack its negatives too
            raise ConfigError(f"config key '{entry}': {modality!r} is optional (data.optional_modalities)")
        if kinds[modality] != "text":
            raise ConfigError(
                f"config key '{entry}': negatives are read as text; the {modality!r} tower reads {kinds[modality]}"
            )
        names = parse_fields(fields)
        if not names:
            raise ConfigError(f"config key '{entry}': names no shard field")
        try:
            check_fields("text", names)
        except DataError as error:
            raise ConfigError(f"config key '{entry}': {error}") from None
