"""Explicit hard negatives read from the shards (data.negatives, data.negatives_per_sample).

A sample's negatives of a text tower are a UTF-8 text field holding one negative caption per line (the
layout of CLIP_benchmark's and SugarCrepe's caption files). Those of an image or audio tower are files:
the field "neg.png" holds one, or "neg.0.png", "neg.1.png", ... hold several (decode.numbered_field).
Either way the first H are taken, fewer repeated in order, and each becomes a row preprocessed by the
modality's own tower preprocessing, stacked as one (H, ...) input that the batch carries apart from the
positives (`Batch.negatives`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Mapping, Sequence, TypeVar

import torch

from mmcl.config import DataConfig, parse_fields
from mmcl.data.decode import SampleError, check_fields
from mmcl.data.pipeline import InputSpec
from mmcl.errors import ConfigError, DataError

NEGATIVE_KINDS = ("text", "image", "audio")  # the input kinds whose negatives can be read from the shards

T = TypeVar("T")


def repeated(values: Sequence[T], per_sample: int) -> List[T]:
    """`per_sample` values: the first ones, or all of them repeated in order, so every sample contributes
    the same H rows (the gather across processes needs equal shapes)."""
    return [values[index % len(values)] for index in range(per_sample)]


def negative_lines(text: str, per_sample: int) -> List[str]:
    """The first `per_sample` non-blank lines, fewer repeated in order. None at all makes the sample
    unusable: it is skipped and counted like any unreadable sample."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SampleError("no negative caption (every line is blank)")
    return repeated(lines, per_sample)


def _preprocess_negative_lines(
    preprocess: Callable[[object], torch.Tensor], per_sample: int, text: object
) -> torch.Tensor:
    rows = [preprocess(line) for line in negative_lines(str(text), per_sample)]
    return torch.stack(rows)  # H x (L,) -> (H, L)


def _preprocess_negative_files(
    preprocess: Callable[[object], torch.Tensor], per_sample: int, decoded: Sequence[object]
) -> torch.Tensor:
    # Each repeat is preprocessed on its own: one view each, augmented anew in training.
    rows = [preprocess(value) for value in repeated(decoded, per_sample)]
    return torch.stack(rows)  # H x (3, S, S) -> (H, 3, S, S); audio: H x (mels, frames)


def negative_inputs(
    cfg: DataConfig, preprocess: Mapping[str, Callable[[object], torch.Tensor]], kinds: Mapping[str, str]
) -> Dict[str, InputSpec]:
    """The stream's extra inputs, "<modality>.negatives" -> how to read them; {} without data.negatives.
    `kinds`: each modality's input kind (text: lines of one field; image, audio: numbered fields)."""
    inputs = {}
    for modality, fields in cfg.negatives.items():
        per_sample, kind = cfg.negatives_per_sample, kinds[modality]
        if kind == "text":
            read = partial(_preprocess_negative_lines, preprocess[modality], per_sample)
            inputs[f"{modality}.negatives"] = InputSpec(kind, parse_fields(fields), read, negatives_of=modality)
        else:
            read = partial(_preprocess_negative_files, preprocess[modality], per_sample)
            inputs[f"{modality}.negatives"] = InputSpec(
                kind, parse_fields(fields), read, negatives_of=modality, numbered=per_sample
            )
    return inputs


def check_negatives_config(cfg: DataConfig, kinds: Mapping[str, str], key: str = "data") -> None:
    """A ConfigError naming the key for negatives the towers cannot be fed from (`kinds`: each fed
    tower's modality -> what it reads)."""
    for i, source in enumerate(cfg.sources):  # every sample needs its H negatives: every source their modality
        lacking = [m for m in cfg.negatives if source.modalities and m not in source.modalities]
        if lacking:
            raise ConfigError(
                f"config key '{key}.sources[{i}].modalities': its samples hold no {lacking[0]!r}, so none of "
                f"the hard negatives {key}.negatives.{lacking[0]} reads"
            )
    for modality, fields in cfg.negatives.items():
        entry = f"{key}.negatives.{modality}"
        if modality not in kinds:
            raise ConfigError(f"config key '{entry}': {modality!r} is not a fed tower ({', '.join(sorted(kinds))})")
        if modality in cfg.optional_modalities:  # a sample lacking the modality would lack its negatives too
            raise ConfigError(f"config key '{entry}': {modality!r} is optional (data.optional_modalities)")
        if kinds[modality] not in NEGATIVE_KINDS:
            raise ConfigError(
                f"config key '{entry}': negatives are read for towers reading {', '.join(NEGATIVE_KINDS)}; "
                f"the {modality!r} tower reads {kinds[modality]}"
            )
        names = parse_fields(fields)
        if not names:
            raise ConfigError(f"config key '{entry}': names no shard field")
        try:  # the tower's own kind: a text field of lines, or image (audio) files
            check_fields(kinds[modality], names)
        except DataError as error:
            raise ConfigError(f"config key '{entry}': {error}") from None
