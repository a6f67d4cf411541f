"""One typed tree of dataclasses for a whole run, loaded from defaults + YAML + `key.sub=value` overrides.

OmegaConf merges the three layers against the dataclass schema, so an unknown key or a value of the
wrong type fails at load time with the key's full dotted name, before any data is read or any model
is built. `check` then validates what a schema cannot express (registry names, tower options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key's dotted name."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: str = ""  # "" (fresh run), "latest", or a checkpoint directory
    progress: bool = True
    log_samples: bool = False  # write each step's sample keys to samples_rank<R>.jsonl (audit / debugging)


@dataclass
class DataConfig:
    train: str = MISSING  # shard URLs, brace notation; several sources joined by "::"
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000
    max_skipped_fraction: float = 0.1  # stop when more than this share of the samples read is unreadable
    # modality -> shard fields holding it, ";"-separated alternatives in order of preference
    fields: Dict[str, str] = field(
        default_factory=lambda: {"image": "jpg;jpeg;png;webp", "text": "txt", "audio": "flac;wav;ogg;mp3"}
    )
    # Modalities a sample may lack (e.g. [image, audio] for a mix of image-text and audio-text pairs):
    # a pair's loss is then taken over the samples holding both. Other modalities are required.
    optional_modalities: List[str] = field(default_factory=list)


@dataclass
class TowerConfig:
    type: str = MISSING  # a name in mmcl.models.TOWERS
    preset: str = ""  # an open_clip model config (or an mmcl preset) whose tower settings are the base
    options: Dict[str, Any] = field(default_factory=dict)  # overrides of the preset's tower settings
    locked: bool = False  # freeze the tower's parameters
    grad_checkpointing: bool = False  # recompute the tower's activations in backward (less memory)


@dataclass
class ModelConfig:
    embed_dim: int = 512
    towers: Dict[str, TowerConfig] = field(default_factory=dict)  # keyed by modality
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    init_logit_bias: Optional[float] = None  # a learnable logit bias (SigLIP: -10), or none
    # Start from these weights (a fresh run only): an mmcl checkpoint directory, a Hugging Face CLIPModel
    # directory, or an open_clip checkpoint file (.pt/.bin/.safetensors). Towers it lacks start fresh.
    init_from: str = ""


@dataclass
class LossConfig:
    name: str = "infonce"  # a name in mmcl.losses.LOSSES
    # Which modality pairs a pairwise loss sums ("image-text"); empty: every pair, or `anchor`'s pairs.
    pairs: List[str] = field(default_factory=list)
    pair_weights: Dict[str, float] = field(default_factory=dict)  # "image-text" -> weight (default 1)
    anchor: str = ""  # ImageBind-style: every modality against this one
    label_smoothing: float = 0.0  # infonce, infonce_tiled
    chunk_size: int = 1024  # infonce_tiled: rows of logits held at once
    beta: float = 0.5  # hcl, hn_nce: hardness concentration
    alpha: float = 1.0  # hn_nce: weight of the positive in the denominator
    tau_plus: float = 0.1  # hcl: prior probability that a negative is a positive
    siglip_exchange: str = "gather"  # siglip across processes: gather | ring
    positive_aggregation: str = "geometric"  # multi_positive: geometric (SupCon) | arithmetic (Poly-View)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/Inf loss or gradient


@dataclass
class EngineConfig:
    backend: str = "torch"  # torch (one process) | deepspeed (any number of processes)
    zero_stage: int = 0  # deepspeed: ZeRO stage 0 (data parallel), 1, 2 or 3
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16
    # Gradient cache: modality -> chunk size (rows embedded with autograd at a time); empty: plain backward.
    grad_cache: Dict[str, int] = field(default_factory=dict)


@dataclass
class EvalConfig:
    datasets: List[str] = field(default_factory=list)  # dataset roots (classnames.txt, templates, test/ shards)
    batch_size: int = 256
    recall_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    every_steps: int = 0  # also evaluate during training every N steps (0: only at the end)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "optim.schedule": ("cosine", "constant"),
    "engine.backend": ("torch", "deepspeed"),
    "engine.zero_stage": (0, 1, 2, 3),
    "engine.device": ("auto", "cpu", "cuda"),
    "engine.precision": ("fp32", "bf16"),
    "loss.siglip_exchange": ("gather", "ring"),
    "loss.positive_aggregation": ("geometric", "arithmetic"),
}


def load(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `a.b=c` overrides; validated, as plain dataclasses."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"config key {key!r}: {error.msg if hasattr(error, 'msg') else error}") from None
    check(config)
    return config


def check(config: Config) -> None:
    """Checks a schema cannot express: enumerations, registry names, ranges, tower options."""
    from mmcl.losses import LOSSES  # local imports: the registries import torch, the schema does not
    from mmcl.models import TOWERS

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if config.loss.name not in LOSSES:
        raise ConfigError(f"config key 'loss.name': unknown loss {config.loss.name!r}; known: {', '.join(LOSSES.names())}")
    if len(config.model.towers) < 2:
        raise ConfigError("config key 'model.towers': at least two towers are needed")
    for modality, tower in config.model.towers.items():
        key = f"model.towers.{modality}"
        if tower.type not in TOWERS:
            raise ConfigError(f"config key '{key}.type': unknown tower {tower.type!r}; known: {', '.join(TOWERS.names())}")
        TOWERS.get(tower.type).check(tower, key)
        if modality not in config.data.fields:
            raise ConfigError(f"config key 'data.fields': no shard field given for tower modality {modality!r}")
    if config.model.init_from and not Path(config.model.init_from).exists():
        raise ConfigError(f"config key 'model.init_from': {config.model.init_from} does not exist")
    for key, value in (("data.batch_size", config.data.batch_size), ("run.steps", config.run.steps),
                       ("model.embed_dim", config.model.embed_dim), ("run.keep_last", config.run.keep_last)):
        if value < 1:
            raise ConfigError(f"config key {key!r}: must be at least 1, got {value}")
    check_loss(config)
    for modality, chunk in config.engine.grad_cache.items():
        key = f"engine.grad_cache.{modality}"
        if modality not in config.model.towers:
            raise ConfigError(f"config key {key!r}: no tower {modality!r}")
        if not 1 <= chunk <= config.data.batch_size:
            raise ConfigError(f"config key {key!r}: chunk size {chunk} must be in 1..data.batch_size "
                              f"({config.data.batch_size})")
    if config.data.workers < 0:
        raise ConfigError(f"config key 'data.workers': must be >= 0, got {config.data.workers}")


def check_loss(config: Config) -> None:
    loss, towers = config.loss, set(config.model.towers)
    for pair in loss.pairs:
        ends = pair.split("-")
        if len(ends) != 2 or ends[0] == ends[1] or not set(ends) <= towers:
            raise ConfigError(f"config key 'loss.pairs': {pair!r} is not 'a-b' for two different towers of {sorted(towers)}")
    for pair in loss.pair_weights:
        if pair not in (loss.pairs or [f"{a}-{b}" for a in towers for b in towers if a != b]):
            raise ConfigError(f"config key 'loss.pair_weights.{pair}': not a pair the loss uses")
    if loss.anchor and loss.anchor not in towers:
        raise ConfigError(f"config key 'loss.anchor': {loss.anchor!r} is not a tower ({', '.join(sorted(towers))})")
    if loss.name == "symile" and len(towers) < 3:
        raise ConfigError(f"config key 'loss.name': symile needs three or more towers, got {len(towers)}")
    if not 0 <= loss.tau_plus < 1:
        raise ConfigError(f"config key 'loss.tau_plus': must be in [0, 1), got {loss.tau_plus}")
    for modality in config.data.optional_modalities:
        if modality not in towers:
            raise ConfigError(f"config key 'data.optional_modalities': {modality!r} is not a tower "
                              f"({', '.join(sorted(towers))})")
    if config.data.optional_modalities:
        from mmcl.losses import build_loss

        if not build_loss(loss).takes_missing:
            raise ConfigError(f"config key 'loss.name': {loss.name!r} cannot score batches with missing "
                              "modalities (data.optional_modalities is set)")
    if loss.chunk_size < 1:
        raise ConfigError(f"config key 'loss.chunk_size': must be at least 1, got {loss.chunk_size}")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml(text: str) -> Config:
    """A config previously written by `to_yaml` (for example, the one stored in a checkpoint)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)
