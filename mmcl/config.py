"""One typed tree of dataclasses for a whole run, loaded from defaults + YAML + `key.sub=value` overrides.

This module is data: the schema, the constraints of single values (declared beside each field as
`choices` or `minimum`), and the two string forms configs use ("a-b" pairs, ";" field lists). OmegaConf
merges the three layers against the schema, so an unknown key or a value of the wrong type fails at
load time with the key's full dotted name, before any data is read or any model is built. What needs
the registries (a loss or tower name, a tower's options, pairs of configured towers) is checked by the
component that builds it, through `mmcl.train.trainer.check_config`, also before any compute.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmcl.errors import ConfigError


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (the default among them)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def at_least(default: Any, minimum: float) -> Any:
    """A numeric field whose value must be at least `minimum`."""
    return field(default=default, metadata={"minimum": minimum})


def each_of(default: List[str], *choices: str) -> Any:
    """A list field whose every item must be one of `choices`."""
    return field(default_factory=lambda: list(default), metadata={"each_of": choices})


def fraction(default: float, below_one: bool = False) -> Any:
    """A number in [0, 1] (or [0, 1) with `below_one`)."""
    return field(default=default, metadata={"minimum": 0.0, "maximum": 1.0, "below_maximum": below_one})


def between(default: float, minimum: float, maximum: float) -> Any:
    """A number in [minimum, maximum]."""
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "below_maximum": False})


def span(default: List[float], low: float = -math.inf, high: float = math.inf, above_low: bool = False) -> Any:
    """A range [a, b] written as a list of two numbers, low <= a <= b <= high (low < a with `above_low`)."""
    return field(default_factory=lambda: list(default), metadata={"span": (low, high, above_low)})


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = at_least(1000, 1)
    log_every: int = at_least(10, 1)
    checkpoint_every: int = at_least(500, 1)
    keep_last: int = at_least(2, 1)
    # Keep the checkpoint of the best value of this metric: "val_loss" (needs data.val) or an evaluation's
    # "<dataset>/<metric>" as eval.json names them ("digits/image_acc1"). checkpoints/best names it, and
    # keep_last's pruning spares it. "": off.
    keep_best: str = ""
    # Which way is better: auto is lower for a name ending in "loss", higher for any other.
    keep_best_mode: str = choice("auto", "min", "max")
    resume: str = ""  # "" (fresh run), "latest", or a checkpoint directory
    progress: bool = True
    log_samples: bool = False  # write each step's sample keys to samples_rank<R>.jsonl (audit / debugging)
    # Where metrics go besides metrics.jsonl; wandb needs `pip install mmcl[wandb]` (WANDB_MODE=offline
    # keeps its files local). A resumed or requeued run appends to the same W&B run.
    log_to: List[str] = each_of(["tensorboard"], "tensorboard", "wandb")
    wandb_project: str = "mmcl"
    wandb_entity: str = ""  # default: the logged-in user's


@dataclass
class SourceConfig:
    """One weighted source of training samples (an item of data.sources)."""

    urls: str = MISSING  # shard URLs, brace notation
    weight: float = at_least(1.0, 0.0)  # its share of the samples drawn, relative to the others' weights
    fields: Dict[str, str] = field(default_factory=dict)  # modality -> its shard fields, where not data.fields
    # The modalities its samples hold ([audio, text]); empty: every tower's. A batch fills the others of
    # its samples with placeholders, left out of the loss.
    modalities: List[str] = field(default_factory=list)


@dataclass
class ImageAugmentConfig:
    """SimCLR's image augmentations, applied in this order to training images only (torchvision's
    transforms.v2). The defaults are open_clip's training transform: a random resized crop of 90-100% of
    the image, nothing else. SimCLR's ImageNet policy: crop_scale [0.08, 1], flip_p 0.5, color_jitter_p
    0.8 at strength 1, grayscale_p 0.2, blur_p 0.5."""

    # The random resized crop's area, as fractions of the image's area, in (0, 1] (aspect ratio 3/4-4/3).
    crop_scale: List[float] = span([0.9, 1.0], 0.0, 1.0, above_low=True)
    flip_p: float = fraction(0.0)  # probability of a horizontal flip
    # Colour jitter with probability color_jitter_p, SimCLR's strength s: brightness, contrast and
    # saturation factors drawn from [1 - 0.8 s, 1 + 0.8 s], hue shifted by up to 0.2 s (at most 0.5: s <= 2.5).
    color_jitter_p: float = fraction(0.0)
    color_jitter_strength: float = between(1.0, 0.0, 2.5)
    grayscale_p: float = fraction(0.0)  # probability of a grayscale image (its three channels equal)
    # Gaussian blur with probability blur_p, sigma drawn from blur_sigma (pixels); the kernel is 10% of the
    # image's side, made odd (SimCLR's).
    blur_p: float = fraction(0.0)
    blur_sigma: List[float] = span([0.1, 2.0], 0.0, above_low=True)


@dataclass
class AudioAugmentConfig:
    """Audio augmentations for training clips only: gain and time shift on the waveform (after the crop to
    the tower's clip length), SpecAugment's masks on the tower's standardised log-mel spectrogram.
    The defaults change nothing."""

    # A gain drawn uniformly from this range (dB) multiplies the clip. The audio tower standardises each
    # clip's log-mel, which undoes a gain except near silence (its log floor): it matters little there.
    gain_db: List[float] = span([0.0, 0.0])
    # A shift of the clip in time by up to this fraction of its length, either way (drawn uniformly).
    time_shift: float = fraction(0.0)
    time_shift_mode: str = choice("circular", "zero")  # circular: what leaves one end enters the other; zero: silence
    # SpecAugment: this many masks, each of a width drawn from 0..max frames (time) or mel bands (frequency)
    # at a random place, set to 0 (the standardised spectrogram's mean).
    time_masks: int = at_least(0, 0)
    time_mask_max_width: int = at_least(0, 0)
    freq_masks: int = at_least(0, 0)
    freq_mask_max_width: int = at_least(0, 0)


@dataclass
class AugmentConfig:
    """Training augmentations by input kind; evaluation and the validation loss are never augmented."""

    image: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
    audio: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)


@dataclass
class DataConfig:
    # Shard URLs, brace notation; several sources joined by "::" are read in proportion to their size,
    # every shard once an epoch. Or data.sources, not both.
    train: str = ""
    # Held-out shard URLs, brace notation, read through data.fields like data.train: the validation loss
    # (eval.val_every). "": none.
    val: str = ""
    sources: List[SourceConfig] = field(default_factory=list)  # sources mixed by weight, sample by sample
    resampled: bool = False  # draw shards with replacement, endlessly (open_clip's --dataset-resampled)
    # A mixed (data.sources) or resampled epoch's length in samples, over all processes: the unit a resume
    # replays. 0: the samples the shards' sizes.json files list.
    epoch_samples: int = at_least(0, 0)
    batch_size: int = at_least(64, 1)  # per process
    workers: int = at_least(2, 0)
    shuffle_buffer: int = at_least(1000, 0)
    max_skipped_fraction: float = fraction(0.1)  # stop when more than this share of the samples read is unreadable
    # modality -> shard fields holding it, ";"-separated alternatives in order of preference
    fields: Dict[str, str] = field(
        default_factory=lambda: {"image": "jpg;jpeg;png;webp", "text": "txt", "audio": "flac;wav;ogg;mp3"}
    )
    # Modalities a sample may lack (e.g. [image, audio] for a mix of image-text and audio-text pairs):
    # a pair's loss is then taken over the samples holding both. Other modalities are required.
    optional_modalities: List[str] = field(default_factory=list)
    # Explicit hard negatives: modality -> the shard field holding a sample's negatives of that modality,
    # ";"-separated alternatives as in data.fields. A text tower's: UTF-8 text, one negative per line
    # ({text: neg.txt}). An image (audio) tower's: files ({image: neg.png}, or "neg.jpg;neg.png"); one
    # in the field itself, several in numbered fields with the index before the extension (neg.0.png,
    # neg.1.png, ...), which a sample holding them reads instead of the unnumbered one. Each negative is
    # preprocessed as the tower's training inputs are (one view each), embedded by the tower and is an
    # extra candidate for the losses that take negatives (infonce, dcl, hcl, hn_nce, multi_positive). A
    # sample without any, with no non-blank line, or with an unreadable negative image or clip, is
    # skipped and counted as unreadable. With data.sources, every source reads them through these fields
    # (each must hold the modality). {}: none.
    negatives: Dict[str, str] = field(default_factory=dict)
    # H, the negatives each sample contributes of every modality in data.negatives: the first H lines (or
    # numbered fields, index 0 to H - 1, those present); a sample with fewer repeats them in order up to
    # H (a repeated negative counts twice in the loss).
    negatives_per_sample: int = at_least(1, 1)
    # How the field of every tower that reads text is read. text: as it is, one caption (multi-line text
    # is tokenised whole). one or all: the field holds several captions of the sample, one per line (as
    # CLIP_benchmark's retrieval shards), or a JSON list of strings under a json key (json:captions);
    # one: each read of the sample draws one caption, from the data's seeded RNG (a resumed run draws
    # the same); all: the first data.captions_per_sample captions are K positives of the sample, embedded
    # as B*K rows and scored as (B, K, D) by a loss taking several views (multi_positive). A sample with
    # no caption (blank lines only, an empty list, not a list of strings) is skipped and counted.
    captions: str = choice("text", "one", "all")
    # K, the captions each sample contributes with data.captions=all: the first K; a sample with fewer
    # repeats them in order up to K (a repeated caption counts twice), so every batch has the same shape.
    captions_per_sample: int = at_least(1, 1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentations (default: none)
    # Augmented views: modality -> K, the views of each sample's image (or audio clip) in training, each an
    # independent draw of its training preprocessing (data.augment), embedded as B*K rows and scored as
    # (B, K, D) by a loss taking several views (multi_positive). Validation and evaluation read one view,
    # never augmented. {}: one view each.
    views: Dict[str, int] = field(default_factory=dict)


@dataclass
class TowerConfig:
    type: str = MISSING  # a name in mmcl.models.TOWERS
    # An open_clip model config (or an mmcl preset) whose tower settings are the base, its top-level
    # `quick_gelu` flag included.
    preset: str = ""
    options: Dict[str, Any] = field(default_factory=dict)  # overrides of the preset's tower settings
    locked: bool = False  # freeze the tower's parameters
    grad_checkpointing: bool = False  # recompute the tower's activations in backward (less memory)
    # This tower's peak learning rate and weight decay, absolute values the schedule scales as it scales
    # optim.lr; null: optim.lr and optim.weight_decay. Norms, biases and gains never decay.
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    # Layer-wise learning-rate decay, in (0, 1] (BEiT's and timm's rule): the embeddings are at depth 0,
    # block i (from 0) at depth i + 1, the final norm and projection at L + 1 for a tower of L blocks;
    # a parameter at depth d trains at lr * layer_decay ** (L + 1 - d). 1: the same rate throughout.
    layer_decay: float = 1.0
    # A locked tower's last N blocks stay trainable, with the final norm and projection above them (open_clip's
    # --lock-image-unlocked-groups N + 1); 0: the whole tower is frozen.
    unlocked_blocks: int = at_least(0, 0)
    unlocked_norms: bool = False  # a locked tower's norm layers stay trainable (gains and biases)
    # A locked tower's frozen parameters train too from this step on (steps counted from 1: 5 keeps them
    # unchanged through step 5). They are in the optimiser from the start, at learning rate 0 until then,
    # so their gradients are computed and count in optim.grad_clip's norm meanwhile. 0: never.
    unlock_after_step: int = at_least(0, 0)


@dataclass
class ModelConfig:
    embed_dim: int = at_least(512, 1)
    towers: Dict[str, TowerConfig] = field(default_factory=dict)  # keyed by modality
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    init_logit_bias: Optional[float] = None  # a learnable logit bias (SigLIP: -10), or none
    # Start from these weights (a fresh run only): an mmcl checkpoint or run directory (its latest checkpoint),
    # a Hugging Face CLIPModel directory, or an open_clip checkpoint file (.pt/.bin/.safetensors). Towers it
    # lacks start fresh.
    init_from: str = ""


@dataclass
class LossConfig:
    name: str = "infonce"  # a name in mmcl.losses.LOSSES
    # Which modality pairs a pairwise loss sums ("image-text"); empty: every pair, or `anchor`'s pairs.
    pairs: List[str] = field(default_factory=list)
    pair_weights: Dict[str, float] = field(default_factory=dict)  # "image-text" -> weight (default 1)
    anchor: str = ""  # ImageBind-style: every modality against this one
    label_smoothing: float = 0.0  # infonce, infonce_tiled
    chunk_size: int = at_least(1024, 1)  # infonce_tiled: rows of logits held at once
    beta: float = at_least(0.5, 0.0)  # hcl, hn_nce: hardness concentration (0: no reweighting)
    alpha: float = 1.0  # hn_nce: weight of the positive in the denominator
    tau_plus: float = fraction(0.1, below_one=True)  # hcl: prior probability that a negative is a positive
    siglip_exchange: str = choice("gather", "ring")  # siglip across processes
    positive_aggregation: str = choice("geometric", "arithmetic")  # multi_positive: SupCon | Poly-View
    # symile: negatives from the product of the other modalities' marginals, N per row (each one's rows
    # shuffled, as the authors default to) or all N^(M-1) combinations.
    symile_negatives: str = choice("n", "n_squared")
    # infonce, dcl, hcl: also contrast each anchor with the other samples of its own modality (the
    # papers' SimCLR form: 2B - 2 negatives); off: the other modality's samples only, as CLIP.
    same_modality_negatives: bool = False
    # multi_positive: views of one modality as positives of each other (a SLIP-style image-image term, in
    # the embedding space the captions are contrasted in; SLIP puts its own on a separate MLP head). Each
    # modality fed K >= 2 rows per sample (data.views, data.captions=all) adds view_weight times SupCon's
    # loss among its own rows: each row's positives are its sample's other rows, its candidates every
    # other row of that modality (and its explicit hard negatives); SimCLR's NT-Xent at K = 2. A sample
    # with fewer than K captions repeats them, and its repeats are then positives of each other. The
    # validation loss reads one image view, so it holds no image-image term. 0: views are positives of
    # the other modality only.
    view_weight: float = at_least(0.0, 0.0)
    view_temperature: float = at_least(0.1, 1e-4)  # of the view term, fixed (SLIP's and SimCLR's 0.1)
    # Distillation from a frozen teacher (open_clip's --distill): an mmcl run or checkpoint directory, a
    # Hugging Face CLIPModel directory, or an open_clip checkpoint file as ARCH=FILE; "": none. Its towers
    # of the loss's modalities must take the same inputs as the student's.
    distill_from: str = ""
    # The loss becomes contrastive + distill_weight * distill, distill being, per pair and direction, the
    # cross-entropy of the student's softmax over its logits against the teacher's.
    distill_weight: float = at_least(1.0, 0.0)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = at_least(100, 0)
    schedule: str = choice("cosine", "constant")
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    # AdamW as torch's fused kernel (one kernel over every parameter of a group, on CPU and CUDA), with
    # the same update rule as torch's default per-parameter loop; false: that loop (or foreach on CUDA).
    fused: bool = True
    max_nonfinite_steps: int = at_least(5, 1)  # stop after this many steps in a row with a NaN/Inf loss or gradient
    # An exponential moving average of the weights, updated after every optimiser step (timm's ModelEmaV2):
    # ema <- ema_decay * ema + (1 - ema_decay) * weights, held in float32, saved in each checkpoint (its full
    # weights as ema.safetensors) and evaluated beside the raw weights. 0: no average (the default).
    ema_decay: float = fraction(0.0, below_one=True)
    # Through this step (steps counted from 1) the average copies the weights instead, so it does not
    # carry the random initialisation into the run; 0: averaging from the first step.
    ema_start_step: int = at_least(0, 0)


@dataclass
class LossScaleConfig:
    """fp16's dynamic loss scale, DeepSpeed's rules and defaults (its fp16 section); the torch engine
    follows the same rules with torch.amp.GradScaler. A step whose gradients overflow is skipped."""

    initial_scale_power: int = at_least(16, 0)  # the scale starts at 2**initial_scale_power
    loss_scale_window: int = at_least(1000, 1)  # steps without an overflow before the scale doubles
    # Overflows absorbed before the scale is first halved (the count is reset whenever it doubles).
    hysteresis: int = at_least(2, 1)
    # The scale's floor; an overflow at the floor counts as a non-finite step (optim.max_nonfinite_steps).
    min_loss_scale: int = at_least(1, 1)


@dataclass
class EngineConfig:
    backend: str = choice("torch", "deepspeed")  # torch: one process; deepspeed: any number
    zero_stage: int = choice(0, 1, 2, 3)  # deepspeed: ZeRO stage 0 (data parallel), 1, 2 or 3
    # The device every process computes on, and so the process group's backend (cpu: gloo, cuda: NCCL).
    device: str = choice("auto", "cpu", "cuda")  # auto: cuda when a GPU is visible
    # fp32; bf16 or fp16 autocast (torch: fp32 weights; deepspeed: bf16/fp16 weights, fp32 master copies).
    # fp16 scales the loss dynamically (engine.loss_scale) so that small gradients do not underflow.
    precision: str = choice("fp32", "bf16", "fp16")
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)  # fp16 only
    # Compile every tower with torch.compile (in place: parameter names, checkpoints and conversion
    # are unchanged). The first steps are slower while it compiles, and again for each new input shape.
    compile: bool = False
    # Gradient cache: modality -> chunk size (rows embedded with autograd at a time); empty: plain backward.
    grad_cache: Dict[str, int] = field(default_factory=dict)


@dataclass
class ProbeConfig:
    """The linear probe on frozen embeddings. "fewshot" learns from a dataset's labelled split
    (<dataset>/<split>/, as CLIP_benchmark does), "halves" fits on one seeded half of the test set and
    scores the other; "auto" is fewshot where the dataset has that split, else halves."""

    mode: str = choice("auto", "fewshot", "halves", "none")
    split: str = "train"
    shots: int = at_least(-1, -1)  # samples per class the few-shot probe fits on (-1: all of them; not 0)
    val_fraction: float = fraction(0.2, below_one=True)  # of the split, held out to choose the regularisation
    seed: int = 0


@dataclass
class EvalConfig:
    datasets: List[str] = field(default_factory=list)  # dataset roots (classnames.txt, templates, test/ shards)
    batch_size: int = at_least(256, 1)
    recall_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    every_steps: int = at_least(0, 0)  # also evaluate during training every N steps (0: only at the end)
    val_every: int = at_least(0, 0)  # the training loss on data.val every N steps, logged as val_loss (0: never)
    # Global batches (data.batch_size x processes) of data.val the validation loss reads: 0, all full ones.
    val_batches: int = at_least(0, 0)
    linear_probe: ProbeConfig = field(default_factory=lambda: ProbeConfig())


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `a.b=c` overrides; typed and checked value by value."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            layer = OmegaConf.load(path)
            _check_list_items(OmegaConf.to_container(layer), Config)
            merged = OmegaConf.merge(merged, layer)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        layer = OmegaConf.from_dotlist(list(overrides))
        _check_list_items(OmegaConf.to_container(layer), Config)
        merged = OmegaConf.merge(merged, layer)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"config key {key!r}: {error.msg if hasattr(error, 'msg') else error}") from None
    check_values(config)
    return config


def _check_list_items(node: Any, schema: type, prefix: str = "") -> None:
    """The items of a list of sections (data.sources) checked one by one, so that an unknown key or a wrong
    type is named with its path and index (OmegaConf names them without either)."""
    if not isinstance(node, dict):
        return
    hints = get_type_hints(schema)
    for name, value in node.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint):
            _check_list_items(value, hint, f"{prefix}{name}.")  # type: ignore[arg-type]
        elif get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]) and isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"config key '{prefix}{name}[{index}]': a mapping of settings, got {item!r}")
                try:
                    OmegaConf.merge(OmegaConf.structured(get_args(hint)[0]), item)
                except OmegaConfBaseException as error:
                    key = f"{prefix}{name}[{index}].{getattr(error, 'full_key', '')}".rstrip(".")
                    raise ConfigError(f"config key {key!r}: {getattr(error, 'msg', error)}") from None


def check_values(node: Any, prefix: str = "") -> None:
    """Every field's declared `choices` and `minimum`, through the whole tree."""
    for spec in dataclasses.fields(node):
        key, value = f"{prefix}{spec.name}", getattr(node, spec.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{key}.")
        elif isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, child in value.items():
                check_values(child, f"{key}.{name}.")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for index, child in enumerate(value):
                check_values(child, f"{key}[{index}].")
        elif "each_of" in spec.metadata and any(item not in spec.metadata["each_of"] for item in value):
            raise ConfigError(
                f"config key {key!r}: {value!r} holds something other than {', '.join(spec.metadata['each_of'])}"
            )
        elif "choices" in spec.metadata and value not in spec.metadata["choices"]:
            raise ConfigError(
                f"config key {key!r}: {value!r} is not one of {', '.join(map(str, spec.metadata['choices']))}"
            )
        elif isinstance(value, float) and math.isnan(value) and {"minimum", "maximum"} & set(spec.metadata):
            raise ConfigError(f"config key {key!r}: must be a number, got nan")
        elif "span" in spec.metadata:
            check_span(key, value, *spec.metadata["span"])
        elif "minimum" in spec.metadata and value < spec.metadata["minimum"]:
            raise ConfigError(f"config key {key!r}: must be at least {spec.metadata['minimum']}, got {value}")
        elif "maximum" in spec.metadata and (
            value > spec.metadata["maximum"] or (spec.metadata["below_maximum"] and value == spec.metadata["maximum"])
        ):
            bound = "below" if spec.metadata["below_maximum"] else "at most"
            raise ConfigError(f"config key {key!r}: must be {bound} {spec.metadata['maximum']}, got {value}")


def check_span(key: str, value: List[float], low: float, high: float, above_low: bool) -> None:
    if len(value) != 2 or any(math.isnan(end) for end in value) or value[0] > value[1]:
        raise ConfigError(f"config key {key!r}: a range [low, high] of two numbers in order, got {value}")
    if value[0] < low or (above_low and value[0] == low) or value[1] > high:
        lower = "(" if above_low else "["
        raise ConfigError(f"config key {key!r}: {value} is not within {lower}{low}, {high}]")


def explicit_keys(path: Optional[str | Path], overrides: Sequence[str]) -> List[str]:
    """The dotted keys the YAML file and the overrides set, whether or not to their default values."""
    layers = [OmegaConf.load(path)] if path is not None else []
    layers.append(OmegaConf.from_dotlist([item for item in overrides if "=" in item]))
    keys: List[str] = []
    for layer in layers:
        keys += _leaf_keys(OmegaConf.to_container(layer), "")
    return sorted(set(keys))


def _leaf_keys(node: Any, prefix: str) -> List[str]:
    if isinstance(node, dict) and node:
        return [key for name, child in node.items() for key in _leaf_keys(child, f"{prefix}{name}.")]
    return [prefix.rstrip(".")]


def parse_pair(text: str, key: str = "loss.pairs") -> Tuple[str, str]:
    """'image-text' -> ("image", "text"); a ConfigError naming `key` for anything else."""
    ends = text.split("-")
    if len(ends) != 2 or not all(ends) or ends[0] == ends[1]:
        raise ConfigError(f"config key {key!r}: {text!r} is not a pair 'a-b' of two different modalities")
    return ends[0], ends[1]


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def parse_fields(text: str) -> List[str]:
    """'jpg;png' -> ["jpg", "png"]: a modality's shard fields in order of preference."""
    return [name for name in text.split(";") if name]


BUNDLED = Path(__file__).parent / "configs"  # the example configs shipped inside the package


def bundled_names() -> List[str]:
    return sorted(path.stem for path in BUNDLED.glob("*.yaml"))


def config_path(name: str | Path) -> Path:
    """A config file's path: the file itself, or else the bundled config of that name ("digits")."""
    path = Path(name)
    if path.is_file():
        return path
    if (BUNDLED / f"{name}.yaml").is_file():
        return BUNDLED / f"{name}.yaml"
    raise ConfigError(f"config {str(name)!r}: no such file, nor a bundled config ({', '.join(bundled_names())})")


def starter_yaml(name: str, source: str | Path) -> str:
    """A config to start a run named `name` from: the bundled (or given) config with run.name set."""
    settings = OmegaConf.load(config_path(source))
    OmegaConf.update(settings, "run.name", name, force_add=True)
    return (
        f"# A starter config for {name!r}, from {config_path(source).name}. Every key and its default is in\n"
        "# mmcl/config.py; any can be overridden on the command line: mmcl train FILE key.sub=value\n"
        + OmegaConf.to_yaml(settings)
    )


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml(text: str, source: str = "config") -> Config:
    """A config previously written by `to_yaml` (for example, the one stored in a checkpoint)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"{source}: not a config this version of mmcl reads ({error})") from None
