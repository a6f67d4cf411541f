"""TrainStream / build_eval_loader: one webdataset pipeline from shards to typed Batches.

shards (seeded order) -> node split -> worker split -> tar samples -> shuffle -> decode + preprocess
-> batch. A modality given a placeholder may be missing from a sample: the placeholder stands in and
`Batch.present` marks it. Unreadable tars and samples are skipped, logged with shard and key, and counted in
`Batch.skipped` so the training loop can report them; nothing here is fatal to a run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from itertools import count, islice
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import webdataset as wds

from mmcl.config import DataConfig, parse_fields
from mmcl.data.batch import Batch
from mmcl.data.decode import SampleError, check_fields, decode_field, decode_numbered_fields, shard_field
from mmcl.data.shards import expand_urls, shard_order, source_of_shards
from mmcl.data.sources import (
    Mixing,
    check_sources,
    epoch_samples,
    mixed_samples,
    process_batches,
    slot_batches,
    training_sources,
)
from mmcl.data.tar_stream import tar_samples
from mmcl.errors import ConfigError, DataError

log = logging.getLogger("mmcl.data")

# A training source of the mixed stream whose samples are unreadable this many times in a row stops the
# run: far beyond a run of bad files, and soon enough to name the misconfigured source.
SOURCE_GIVES_UP_AFTER = 1000


@dataclass
class InputSpec:
    """How one modality is read: which decoder, from which shard fields, then which preprocessing."""

    kind: str  # "image" | "text" | "audio" | "label"
    fields: Sequence[str]
    preprocess: Callable[[object], torch.Tensor]
    # For a modality samples may lack: the input standing in for it (masked out of the loss). None: required.
    placeholder: Optional[torch.Tensor] = None
    # preprocess returns (K, ...): K rows per sample, K varying (several captions of one image, in
    # evaluation); the batch holds every sample's rows concatenated and `Batch.counts` their K.
    ragged: bool = False
    # preprocess returns (K, ...) with K = views for every sample (several captions of one sample, or K
    # augmented views): the batch holds (B, K, ...), the step embeds B*K rows and the loss gets (B, K, D)
    # (mmcl.train.views). The placeholder keeps one row's shape; a sample lacking the modality repeats it.
    views: int = 1
    # The modality whose explicit hard negatives this input holds ((H, ...) per sample): the batch carries
    # it in `Batch.negatives`, apart from the inputs. "": an input of its own.
    negatives_of: str = ""
    # > 0: the value is a list, read from up to this many numbered fields ("neg.0.png", "neg.1.png", ...;
    # decode.numbered_field) or else the unnumbered one: several images or clips of one sample (negatives).
    numbered: int = 0

    def __post_init__(self) -> None:
        check_fields(self.kind, self.fields)
        if (self.ragged or self.numbered) and self.placeholder is not None:
            raise ValueError("a ragged input or one of numbered fields cannot have a placeholder")
        if self.views < 1 or (self.views > 1 and (self.ragged or self.negatives_of)):
            raise ValueError("views: at least 1, and a ragged input or negatives have one view per sample")


def check_data_config(cfg: DataConfig, kinds: Mapping[str, str], frozen: Sequence[str] = (), key: str = "data") -> None:
    """A ConfigError naming the key for data settings the towers cannot be fed from, or for local
    training shards that do not exist. `kinds`: each tower's modality -> what it reads (image, ...);
    `frozen`: the towers frozen whole, which need no samples."""
    modalities = list(kinds)
    check_sources(cfg, modalities, frozen)
    field_settings = [(f"{key}.fields", cfg.fields, modalities)] + [
        (f"{key}.sources[{i}].fields", {**cfg.fields, **s.fields}, s.modalities or modalities)
        for i, s in enumerate(cfg.sources)
    ]
    for fields_key, fields, read in field_settings:
        for modality in read:
            if modality not in fields:
                raise ConfigError(f"config key '{fields_key}': no shard field given for tower modality {modality!r}")
            names = parse_fields(fields[modality])
            if not names:
                raise ConfigError(f"config key '{fields_key}.{modality}': names no shard field")
            try:
                check_fields(kinds[modality], names)
            except DataError as error:
                raise ConfigError(f"config key '{fields_key}.{modality}': {error}") from None
    for modality in cfg.optional_modalities:
        if modality not in modalities:
            raise ConfigError(
                f"config key '{key}.optional_modalities': {modality!r} is not a tower ({', '.join(sorted(modalities))})"
            )
    if cfg.sources or cfg.resampled:
        epoch_samples(cfg, training_sources(cfg, modalities))  # the epoch's length is known


class SkipLog:
    """Counts skipped samples inside one worker; each batch takes the count accrued before it. With
    `give_up_after`, a training source whose samples are all unreadable (a field it lacks, say) stops the
    run after that many in a row, instead of being skipped forever while the other sources fill the batches."""

    def __init__(self, give_up_after: int = 0) -> None:
        self.count = 0
        self.give_up_after = give_up_after
        self.in_a_row: Dict[int, int] = {}  # source -> its unreadable samples since its last readable one

    def skip(self, where: str, reason: str, source: Optional[int] = None) -> None:
        self.count += 1
        log.warning("skipped %s: %s", where, reason)
        if source is None:
            return
        self.in_a_row[source] = self.in_a_row.get(source, 0) + 1
        if self.give_up_after and self.in_a_row[source] >= self.give_up_after:
            raise DataError(
                f"training source {source}: its last {self.give_up_after} samples were all unreadable, "
                f"the last {where}: {reason}; check the fields it is read through"
            )

    def kept(self, source: int) -> None:
        self.in_a_row[source] = 0

    def tar_error(self, error: Exception) -> bool:
        # webdataset handler protocol: return True to go on. It appends the shard URL to error.args.
        self.skip(str(error.args[-1]) if error.args else "?", repr(error))
        return True

    def take(self) -> int:
        taken, self.count = self.count, 0
        return taken


def _decode_and_batch(
    samples: Iterator[dict],
    inputs: Dict[str, InputSpec],
    batch_size: int,
    partial: bool,
    skips: SkipLog,
    source_inputs: Sequence[Dict[str, InputSpec]] = (),
) -> Iterator[Batch]:
    """`source_inputs`: what each source's samples hold and through which fields (a sample's `__source__`
    picks one); without them, every sample is read as `inputs` says."""
    buffer: List[tuple] = []
    for sample in samples:
        where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        source = sample.get("__source__", 0)
        try:
            tensors = _decode_sample(sample, source_inputs[source] if source_inputs else inputs)
        except SampleError as error:
            skips.skip(where, str(error), source)
            continue
        except Exception as error:  # a transform failing on odd data (tiny or huge image) is bad data too
            skips.skip(where, f"{type(error).__name__}: {error}", source)
            continue
        skips.kept(source)
        buffer.append((where, source, tensors))
        if len(buffer) == batch_size:
            yield _collate(buffer, inputs, skips.take())
            buffer = []
    if buffer and partial:
        yield _collate(buffer, inputs, skips.take())
    elif partial and skips.count:  # samples skipped after the last batch: an empty batch carries their count
        yield Batch({}, [], skips.take())


def _decode_sample(sample: dict, inputs: Dict[str, InputSpec]) -> Dict[str, Optional[torch.Tensor]]:
    """modality -> preprocessed tensor, or None for an optional modality the sample lacks (a modality its
    source does not hold is not in `inputs`, and so not in the result)."""
    tensors: Dict[str, Optional[torch.Tensor]] = {}
    for modality, spec in inputs.items():
        if spec.placeholder is not None and not any(shard_field(name) in sample for name in spec.fields):
            tensors[modality] = None
        elif spec.numbered:
            tensors[modality] = spec.preprocess(decode_numbered_fields(sample, spec.kind, spec.fields, spec.numbered))
        else:
            tensors[modality] = spec.preprocess(decode_field(sample, spec.kind, spec.fields))
    if any(spec.placeholder is not None for spec in inputs.values()):
        present = [
            m for m, t in tensors.items() if t is not None and inputs[m].kind != "label" and not inputs[m].negatives_of
        ]
        if len(present) < 2:
            raise SampleError(f"only {present or 'no modality'} present: nothing to contrast")
    return tensors


def _collate(items: List[tuple], inputs: Dict[str, InputSpec], skipped: int) -> Batch:
    batch_inputs, present, counts, negatives = {}, {}, {}, {}
    for modality, spec in inputs.items():
        rows: List[Optional[torch.Tensor]] = [tensors.get(modality) for _, _, tensors in items]
        if spec.negatives_of:
            negatives[spec.negatives_of] = torch.stack(rows)  # type: ignore[arg-type]  # B x (H, ...) -> (B, H, ...)
            continue
        if spec.ragged:
            batch_inputs[modality] = torch.cat(rows)  # type: ignore[arg-type]  # (sum K, ...)
            counts[modality] = torch.tensor([len(row) for row in rows])  # type: ignore[arg-type]  # (B,)
            present[modality] = torch.ones(len(rows), dtype=torch.bool)
            continue
        present[modality] = torch.tensor([row is not None for row in rows])  # (B,) bool
        placeholder = spec.placeholder
        if placeholder is not None and spec.views > 1:
            placeholder = placeholder.expand(spec.views, *placeholder.shape)  # (...) -> (K, ...)
        filled = [row if row is not None else placeholder for row in rows]  # a None row has a placeholder
        batch_inputs[modality] = torch.stack(filled)  # type: ignore[arg-type]  # (B, ...), or (B, K, ...) for views
    keys = [where for where, _, _ in items]
    sources = [source for _, source, _ in items]
    return Batch(batch_inputs, keys, skipped, present, counts, sources, negatives)


def _pipeline(
    urls: List[str],
    inputs: Dict[str, InputSpec],
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
    partial: bool,
    split_by_node: bool = True,
    source_of: Optional[Mapping[str, int]] = None,
) -> wds.DataPipeline:
    """Every shard once, split over processes and workers. `source_of`: shard -> its source's index."""
    skips = SkipLog()
    ordered = shard_order(urls, seed, epoch) if shuffle_buffer else urls
    node_split = [wds.split_by_node] if split_by_node else []
    stages = [
        wds.SimpleShardList(ordered),
        *node_split,
        wds.split_by_worker,
        tar_samples(skips.tar_error),
    ]
    if shuffle_buffer:
        stages.append(_seeded_shuffle(shuffle_buffer, seed, epoch))
    if source_of:
        stages.append(_tag_sources(source_of))
    stages.append(lambda samples: _decode_and_batch(samples, inputs, batch_size, partial, skips))
    return wds.DataPipeline(*stages)


def _tag_sources(source_of: Mapping[str, int]) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Each sample tagged in place with the index of its shard's source."""

    def tag(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__source__"] = source_of[sample["__url__"]]
            yield sample

    return tag


def _mixed_pipeline(
    mixing: Mixing, inputs: Dict[str, InputSpec], batch_size: int, seed: int, epoch: int, shuffle_buffer: int
) -> wds.DataPipeline:
    """One epoch of the mixed stream in this slot: samples drawn by weight from the sources, each decoded
    as its source says; modalities a source lacks take their placeholders."""
    skips = SkipLog(give_up_after=SOURCE_GIVES_UP_AFTER)
    # Each source's modalities through its own fields; hard negatives through data.negatives' (every source
    # holds their modality: check_negatives_config).
    negatives = {name: spec for name, spec in inputs.items() if spec.negatives_of}
    source_inputs = [
        {**{m: replace(inputs[m], fields=fields) for m, fields in source.fields.items()}, **negatives}
        for source in mixing.sources
    ]
    return wds.DataPipeline(
        lambda: mixed_samples(mixing, seed, epoch, shuffle_buffer, skips.tar_error),
        lambda samples: islice(
            _decode_and_batch(samples, inputs, batch_size, False, skips, source_inputs),
            slot_batches(mixing, batch_size),
        ),
    )


def _seeded_shuffle(bufsize: int, seed: int, epoch: int) -> Callable[[Iterator[dict]], Iterator[dict]]:
    def shuffle(samples: Iterator[dict]) -> Iterator[dict]:
        # The RNG is made inside the worker so each (rank, worker) draws its own reproducible order.
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}")
        return wds.shuffle(bufsize, min(bufsize, 100), rng=rng)(samples)

    return shuffle


class TrainStream:
    """Endless batches for training, epoch after epoch, each epoch in a new seeded order: every shard once
    an epoch (data.train), or, given a `mixing`, epochs of a fixed length drawn by weight from several
    sources or with replacement (sources.py).

    The stream's position is (epoch, batches taken in it); `position` reports it and the constructor's
    `start` resumes from it exactly: the epoch is rebuilt with the same seeds and the batches already
    taken are drawn again and dropped. Every random choice of the data (shard orders and draws, source
    choices, shuffle buffers, augmentation) comes from seeds of (seed, epoch, rank, worker), never from
    the training process's RNG, so a resumed stream yields the very batches the uninterrupted one would
    have.
    """

    def __init__(
        self,
        urls: str,
        inputs: Dict[str, InputSpec],
        batch_size: int,
        workers: int,
        shuffle_buffer: int,
        seed: int,
        start: tuple = (0, 0),
        mixing: Optional[Mixing] = None,
    ) -> None:
        self.urls = expand_urls(urls) if mixing is None else [s for src in mixing.sources for s in src.shards]
        self.source_of = source_of_shards(urls) if mixing is None else {}
        self.mixing = mixing
        self.inputs = inputs
        self.batch_size = batch_size
        self.workers = workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch, self.taken = start

    @property
    def position(self) -> tuple:
        if self.mixing is not None and self.taken == process_batches(self.mixing, self.batch_size):
            return self.epoch + 1, 0  # an epoch just finished: a resume starts the next, replaying nothing
        return self.epoch, self.taken

    def __iter__(self) -> Iterator[Batch]:
        skip = self.taken
        for epoch in count(self.epoch):
            self.epoch, self.taken = epoch, 0
            for batch in self._epoch_batches(epoch):
                self.taken += 1
                if self.taken > skip:
                    yield batch
            if self.taken == 0:
                raise DataError(
                    f"an epoch over {len(self.urls)} shard(s) produced no full batch of "
                    f"{self.batch_size}: too few readable samples per worker"
                )
            skip = 0

    def _epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if self.mixing is None:
            pipeline = _pipeline(
                self.urls,
                self.inputs,
                self.batch_size,
                self.seed,
                epoch,
                self.shuffle_buffer,
                partial=False,
                source_of=self.source_of,
            )
        else:
            pipeline = _mixed_pipeline(self.mixing, self.inputs, self.batch_size, self.seed, epoch, self.shuffle_buffer)
        rank = wds.utils.pytorch_worker_info()[0]
        # Augmentations draw from torch's RNG: seed it per (seed, epoch, rank), apart from the model's.
        data_seed = hash((self.seed, epoch, rank)) % 2**62
        if self.workers > 0:  # each worker's torch RNG is seeded from this generator
            generator = torch.Generator().manual_seed(data_seed)
            yield from wds.WebLoader(pipeline, batch_size=None, num_workers=self.workers, generator=generator)
        else:  # in-process: swap the data's own RNG state in and out around each batch
            data_rng = torch.Generator().manual_seed(data_seed).get_state()
            batches = iter(pipeline)
            while True:
                outer = torch.get_rng_state()
                torch.set_rng_state(data_rng)
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    data_rng = torch.get_rng_state()
                    torch.set_rng_state(outer)
                yield batch


def build_eval_loader(
    urls: str | List[str], inputs: Dict[str, InputSpec], batch_size: int, workers: int = 0
) -> wds.WebLoader:
    """Every readable sample of these shards once, in shard order, the last batch partial; samples
    skipped after the last batch come as an empty batch carrying their count. The shards are not split
    across processes: a distributed evaluation hands each process its own."""
    shards = expand_urls(urls) if isinstance(urls, str) else list(urls)
    pipeline = _pipeline(
        shards, inputs, batch_size, seed=0, epoch=0, shuffle_buffer=0, partial=True, split_by_node=False
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)


def held_out_batches(
    urls: str, inputs: Dict[str, InputSpec], batch_size: int, rank: int, world: int
) -> Iterator[Batch]:
    """This process's rows of every global batch of `batch_size` x `world` samples of these shards, read
    in one fixed order (shards as listed, samples as each holds them; no shuffle, nothing seeded), in
    process. Every process reads every shard but decodes only its rows (rank r: rows r*B..r*B+B-1 of
    each global batch), so a global batch holds the same samples whatever the number of processes. The
    last batch may be partial; unreadable samples are skipped and counted in `Batch.skipped`."""
    skips = SkipLog()

    def mine(samples: Iterator[dict]) -> Iterator[dict]:
        for index, sample in enumerate(samples):
            if index % (batch_size * world) // batch_size == rank:
                yield sample

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_urls(urls)),
        tar_samples(skips.tar_error),
        mine,
        lambda samples: _decode_and_batch(samples, inputs, batch_size, True, skips),
    )
    return iter(pipeline)


def batches_from_samples(samples: Iterator[dict], inputs: Dict[str, InputSpec], batch_size: int) -> Iterator[Batch]:
    """The decode-and-batch stage over samples that are not in shards (e.g. a folder of files), in order,
    the last batch partial; unreadable samples are skipped and counted as in the stream."""
    return _decode_and_batch(samples, inputs, batch_size, partial=True, skips=SkipLog())
