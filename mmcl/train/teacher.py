"""The frozen teacher of distillation (`loss.distill_from`): checked before any compute, built once.

The teacher is any model `mmcl eval` reads (mmcl/checkpoint/saved_model.py). It lives beside the
engine, not in it: its parameters are in no optimiser group, no ZeRO partition and no checkpoint (a
resumed run loads it again from its path). It runs in evaluation mode without autograd, in the run's
precision on the run's device, and embeds each batch once, before the backward; the loss gets its
embeddings and logit scale (mmcl/losses/distill.py), with the gradient cache too, where they ride
along with the loss's other arguments.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from mmcl.checkpoint.saved_model import config_of, load_saved_model, parse_spec, saved_model
from mmcl.config import LossConfig, ModelConfig, TowerConfig
from mmcl.errors import CheckpointError, ConfigError
from mmcl.losses.base import pairs_to_score
from mmcl.models import TOWERS, Encoded, MultiEncoder
from mmcl.train.gradcache import float32


def distilled_modalities(loss: LossConfig, modalities: Sequence[str]) -> List[str]:
    """The modalities of the pairs the loss scores: the ones the teacher must embed."""
    return sorted({m for pair in pairs_to_score(loss, modalities) for m in pair})


def _inputs(tower: TowerConfig, key: str) -> Dict[str, Any]:
    tower_class = TOWERS.get(tower.type)
    return {"kind": tower_class.input_kind, **tower_class.input_settings(tower, key)}


def check_teacher(loss: LossConfig, model: ModelConfig, optional: Sequence[str], key: str = "loss") -> None:
    """A ConfigError naming `loss.distill_from` for a teacher that is missing or unreadable, lacks a
    tower of the loss's modalities, or takes other inputs than the student (image size, tokens, audio
    features); read from the teacher's config, no weight loaded."""
    if not loss.distill_from:
        return
    name = f"{key}.distill_from"
    try:
        teacher = config_of(saved_model(*parse_spec(loss.distill_from)))
    except (FileNotFoundError, NotADirectoryError, CheckpointError, ConfigError) as error:
        raise ConfigError(f"config key {name!r}: {loss.distill_from}: {error}") from None
    for modality in distilled_modalities(loss, list(model.towers)):
        if modality not in teacher.model.towers:
            raise ConfigError(
                f"config key {name!r}: the teacher {loss.distill_from} has no {modality} tower "
                f"(it has {', '.join(sorted(teacher.model.towers))})"
            )
        student_inputs = _inputs(model.towers[modality], f"model.towers.{modality}")
        teacher_inputs = _inputs(teacher.model.towers[modality], f"{name}: towers.{modality}")
        if student_inputs != teacher_inputs:
            raise ConfigError(
                f"config key {name!r}: the teacher's {modality} tower takes other inputs than the "
                f"student's: {teacher_inputs} vs {student_inputs}"
            )
    if optional:
        raise ConfigError(
            f"config key {name!r}: distillation scores every sample of the batch, so it cannot train on "
            f"samples lacking a modality ({', '.join(optional)})"
        )


class Teacher:
    """A frozen model that embeds the batch for the distillation term."""

    def __init__(self, model: MultiEncoder, modalities: Sequence[str], precision: str, device: torch.device) -> None:
        # bf16 runs hold the teacher in bf16 too: it has no optimiser, so no fp32 master copy is needed.
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.modalities = list(modalities)

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> Encoded:
        """The teacher's unit-norm embeddings (float32, like the student's in the loss) and logit scale."""
        # Floating-point inputs in the teacher's dtype; token ids stay integers.
        cast = {m: inputs[m].to(self.dtype) if inputs[m].is_floating_point() else inputs[m] for m in self.modalities}
        with torch.no_grad():
            return float32(self.model(cast))


def build_teacher(loss: LossConfig, model: ModelConfig, precision: str, device: torch.device) -> Optional[Teacher]:
    """The teacher `loss.distill_from` names (None without one), loaded without touching the run's RNG,
    so that the student's initial weights and the run's random draws are those of the same run without it."""
    if not loss.distill_from:
        return None
    with torch.random.fork_rng(devices=[]):  # building the model draws its (discarded) initial weights
        network, _ = load_saved_model(saved_model(*parse_spec(loss.distill_from)), device)
    return Teacher(network, distilled_modalities(loss, list(model.towers)), precision, device)
