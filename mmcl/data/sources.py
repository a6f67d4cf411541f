"""Training sources: which shards, how often each is drawn, which modalities its samples hold and through
which shard fields.

Two ways to give them:
- `data.train: "a/{0..9}.tar::b/{0..3}.tar"`: sources read in proportion to their size, every shard once an
  epoch (or, with `data.resampled`, shards drawn with replacement from all of them, as open_clip's
  `--dataset-resampled`);
- `data.sources`: a list of {urls, weight, fields, modalities}: a mixed stream draws each sample from a
  source chosen by weight, so an image-text set and an audio-text set of any sizes mix in a set ratio.

The mixed stream is endless and cut into epochs of `data.epoch_samples` samples, the unit a resume
replays: epoch e's every choice (source sequence, shard orders or draws, shuffle buffers) is seeded by
(seed, e, source, process slot), so it is rebuilt exactly from its number.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import count
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import webdataset as wds

from mmcl.config import DataConfig, parse_fields
from mmcl.data.shards import check_local_shards, expand_urls, read_sizes
from mmcl.data.tar_stream import tar_samples
from mmcl.errors import ConfigError, DataError

# The mixed stream draws sources in blocks of this many samples: each block holds each source's share of
# it to within one sample (systematic sampling), so shares hold at every scale, not only on average.
MIX_BLOCK = 100


@dataclass(frozen=True)
class Source:
    shards: List[str]
    weight: float  # relative: the mixed stream draws a sample from it with probability weight / total
    fields: Dict[str, List[str]]  # each modality its samples hold -> its shard fields, in order of preference


@dataclass(frozen=True)
class Mixing:
    """How the mixed stream draws: from which sources, with or without replacement, how long an epoch is."""

    sources: List[Source]
    resampled: bool
    epoch_samples: int  # over all processes


def training_sources(cfg: DataConfig, modalities: Sequence[str]) -> List[Source]:
    """The sources of data.sources, or else one per "::" part of data.train (weighted by its shard count,
    as reading every shard once weighs it)."""
    if cfg.sources:
        return [
            Source(expand_urls(s.urls), s.weight, {m: parse_fields(s.fields.get(m, cfg.fields[m]))
                                                   for m in (s.modalities or modalities)})
            for s in cfg.sources
        ]  # fmt: skip
    fields = {m: parse_fields(cfg.fields[m]) for m in modalities}
    parts = [expand_urls(part) for part in cfg.train.split("::") if part]
    return [Source(shards, len(shards), fields) for shards in parts]


def build_mixing(cfg: DataConfig, sources: List[Source]) -> Optional[Mixing]:
    """The mixed stream's settings, or None for the plain epoch stream (data.train, not resampled). In
    resampled mode data.train's parts, weighted by their shard counts, draw shards uniformly from all of
    them, as open_clip does."""
    if not cfg.sources and not cfg.resampled:
        return None
    return Mixing(sources, cfg.resampled, epoch_samples(cfg, sources))


def epoch_samples(cfg: DataConfig, sources: List[Source]) -> int:
    """data.epoch_samples, or else the samples the sources' sizes.json files list."""
    if cfg.epoch_samples:
        return cfg.epoch_samples
    total = read_sizes([shard for source in sources for shard in source.shards])
    if not total:
        raise ConfigError(
            "config key 'data.epoch_samples': the sources' shards are not all listed in a sizes.json beside "
            "them, so a mixed or resampled epoch has no length: set data.epoch_samples (samples per epoch, "
            "over all processes; a resume replays at most one epoch)"
        )
    return total


def optional_modalities(cfg: DataConfig, modalities: Sequence[str]) -> List[str]:
    """Modalities a batch may lack for some samples: data.optional_modalities and those a source lacks."""
    lacking = {m for s in cfg.sources if s.modalities for m in modalities if m not in s.modalities}
    return [m for m in modalities if m in lacking or m in cfg.optional_modalities]


def held_modalities(cfg: DataConfig, modalities: Sequence[str]) -> List[str]:
    """The towers' modalities the training samples hold: all of them for data.train, else those of some source."""
    return [m for m in modalities if not cfg.sources or any(m in (s.modalities or modalities) for s in cfg.sources)]


def check_sources(cfg: DataConfig, modalities: Sequence[str], frozen: Sequence[str] = ()) -> None:
    """A ConfigError naming the key for a source list that cannot feed these towers. A tower frozen whole
    may have no source: it comes along unchanged (ImageBind's binding of a new tower to a frozen pair)."""
    if bool(cfg.train) == bool(cfg.sources):
        raise ConfigError(
            "config key 'data.train': give the training shards as data.train or as data.sources "
            f"(a list of {{urls, weight}}), {'not both' if cfg.train else 'neither is set'}"
        )
    if cfg.train:
        check_local_shards(cfg.train, "data.train")
    for i, source in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        check_local_shards(source.urls, f"{key}.urls")
        if not 0 < source.weight < math.inf:
            raise ConfigError(f"config key '{key}.weight': must be above 0 and finite, got {source.weight}")
        unknown = [m for m in [*source.modalities, *source.fields] if m not in modalities]
        if unknown:
            raise ConfigError(f"config key '{key}': {unknown[0]!r} is not a tower ({', '.join(modalities)})")
        if source.modalities and len(set(source.modalities)) < 2:
            raise ConfigError(f"config key '{key}.modalities': a source must hold two modalities to contrast")
    for modality in modalities:
        if modality not in held_modalities(cfg, modalities) and modality not in frozen:
            raise ConfigError(
                f"config key 'data.sources': no source holds the {modality!r} tower's modality; a tower "
                f"without samples cannot learn (model.towers.{modality}.locked=true keeps it frozen)"
            )


def source_sequence(weights: Sequence[float], rng: random.Random) -> Iterator[int]:
    """Endless source indices: in each block of MIX_BLOCK, source i appears MIX_BLOCK * w_i / sum(w) times
    rounded up or down (systematic sampling: one random offset, so exact in expectation), block shuffled."""
    edges = [MIX_BLOCK * math.fsum(weights[: i + 1]) / math.fsum(weights) for i in range(len(weights))]
    edges[-1] = MIX_BLOCK  # no rounding short of a full block
    while True:
        offset = rng.random()
        block: List[int] = []
        for i, (start, end) in enumerate(zip([0.0, *edges[:-1]], edges, strict=True)):
            block += [i] * (math.floor(end - offset) - math.floor(start - offset))  # points offset + k in (start, end]
        rng.shuffle(block)
        yield from block


@dataclass(frozen=True)
class Slot:
    """One reader of the stream: a loader worker of one process, numbered among all processes' workers."""

    index: int
    count: int

    @staticmethod
    def current() -> "Slot":
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return Slot(rank * workers + worker, world * workers)


def _pass_plan(source: Source, index: int, resampled: bool, seed: int, epoch: int, number: int, slot: Slot,
               draw: random.Random) -> Tuple[List[str], int, int]:  # fmt: skip
    """Pass `number` of one source in this slot: (shards to read, keep every k-th sample, from the j-th).

    Without replacement every slot shuffles the shards alike and takes its share; with fewer shards than
    slots, every slot reads them all and keeps its share of the samples, so no sample is read twice in a
    pass. With replacement each slot draws for itself, as open_clip's ResampledShards."""
    if resampled:
        return [draw.choice(source.shards) for _ in source.shards], 1, 0
    order = list(source.shards)
    random.Random(f"{seed}:{epoch}:{index}:pass{number}").shuffle(order)
    if len(order) >= slot.count:
        return order[slot.index :: slot.count], 1, 0
    return order, slot.count, slot.index


def source_samples(
    index: int, source: Source, resampled: bool, seed: int, epoch: int, slot: Slot, handler: Callable[[Exception], bool]
) -> Iterator[dict]:
    """One source's samples in this slot, endless, tagged with `__source__`: pass after pass over its shards,
    each pass in a new seeded order, or shards drawn with replacement. An unreadable shard is skipped (and
    counted by `handler`); a source none of whose shards gives a sample stops the run, naming it."""
    draw = random.Random(f"{seed}:{epoch}:{index}:{slot.index}")
    tried: Set[str] = set()  # shards opened since the source last gave a sample
    for number in count():
        shards, every, first = _pass_plan(source, index, resampled, seed, epoch, number, slot, draw)
        kept = read = 0
        for read, sample in enumerate(tar_samples(handler)(_opened(shards, tried)), start=1):
            tried.clear()
            if (read - 1) % every == first:
                kept += 1
                sample["__source__"] = index  # the sample is a fresh dict: tag it, do not copy it
                yield sample
        if tried >= set(source.shards):
            raise DataError(
                f"training source {index} ({source.shards[0]}, ...): none of its {len(source.shards)} "
                "shards gave a readable sample"
            )
        if read and not kept:
            raise DataError(
                f"training source {index} ({source.shards[0]}, ...): a pass over it holds {read} "
                f"samples, fewer than its {slot.count} readers (processes x loader workers); use "
                "data.resampled, or fewer loader workers"
            )


def _opened(shards: List[str], tried: Set[str]) -> Iterator[Dict[str, str]]:
    for url in shards:
        tried.add(url)
        yield {"url": url}


def mixed_samples(
    mixing: Mixing, seed: int, epoch: int, shuffle_buffer: int, handler: Callable[[Exception], bool]
) -> Iterator[dict]:
    """This slot's samples of one epoch, endless: each from a source chosen by weight, each source's samples
    through its own seeded shuffle buffer, sized by its weight so that the buffers together hold about
    `shuffle_buffer` samples, as the plain stream's one buffer does."""
    slot = Slot.current()
    total = math.fsum(s.weight for s in mixing.sources)
    streams = []
    for index, source in enumerate(mixing.sources):
        samples = source_samples(index, source, mixing.resampled, seed, epoch, slot, handler)
        if shuffle_buffer:
            size = max(10, math.ceil(shuffle_buffer * source.weight / total))
            shuffle_rng = random.Random(f"{seed}:{epoch}:{index}:{slot.index}:shuffle")
            samples = wds.shuffle(size, min(size, 100), rng=shuffle_rng)(samples)
        streams.append(samples)
    sequence = source_sequence([s.weight for s in mixing.sources], random.Random(f"{seed}:{epoch}:mix:{slot.index}"))
    for index in sequence:
        yield next(streams[index])


def process_batches(mixing: Mixing, batch_size: int) -> int:
    """The batches each process takes in one epoch of the mixed stream."""
    world = wds.utils.pytorch_worker_info()[1]
    return max(1, mixing.epoch_samples // (batch_size * world))


def slot_batches(mixing: Mixing, batch_size: int) -> int:
    """The batches this slot yields in one epoch: its process's, split over the process's loader workers."""
    per_process = process_batches(mixing, batch_size)
    _, _, worker, workers = wds.utils.pytorch_worker_info()
    return per_process // workers + (worker < per_process % workers)
