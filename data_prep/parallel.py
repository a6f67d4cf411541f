"""A shard set written by several processes, resumable after a crash.

Shard j is a pure function of the input rows [j*S, (j+1)*S) (S samples per shard): the main process
reads the input and hands each chunk of S rows to a worker, which validates them and writes the chunk's
shard on its own; rejected rows make a shard smaller, never move rows to another. A bounded number of
chunks is in flight, so memory does not grow with the input.

Work in progress lives in `<out>/_prep/`: `run.json` (the input and settings, which a rerun must match),
and per finished chunk `{j:06d}.tar` (written under a temporary name, renamed when complete) followed by
`{j:06d}.json`, its record (rows, samples, fields, rejected rows). A chunk is finished when its record
exists; a rerun keeps finished chunks and writes the others, overwriting any temporary or unrecorded
shard a crash left. When every chunk has its record, the shards holding samples are moved to
`<out>/{n:06d}.tar` in chunk order, sizes.json and _stats.json are written from the records, and
`_prep/` is removed. A chunk whose rows were all rejected leaves no shard, so the set stays contiguous
and holds no empty tar, which every reader would open for nothing.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Set, Tuple, TypeVar

from tqdm import tqdm

from data_prep.writer import write_index, write_json
from mmcl.errors import ConfigError, DataError

STAGING = "_prep"
CHUNKS_PER_WORKER = 2  # chunks queued per worker: one to work on, one ready; memory stays bounded

Row = TypeVar("Row")
log = logging.getLogger(__name__)


@dataclass
class ShardRecord:
    """What one chunk of rows became: samples, their fields, and the rows rejected with their reasons."""

    rows: int
    samples: int = 0
    fields: Dict[str, int] = field(default_factory=dict)
    field_bytes: Dict[str, int] = field(default_factory=dict)
    rejected_inputs: List[Dict[str, str]] = field(default_factory=list)

    def add(self, sample: Mapping[str, Any]) -> None:
        self.samples += 1
        for name, value in sample.items():
            if not name.startswith("__"):
                self.fields[name] = self.fields.get(name, 0) + 1
                size = len(value) if isinstance(value, (bytes, str)) else 0
                self.field_bytes[name] = self.field_bytes.get(name, 0) + size

    def reject(self, source: str, reason: str) -> None:
        self.rejected_inputs.append({"source": source, "reason": reason})


ChunkWriter = Callable[[Path, List[Row]], ShardRecord]  # (shard path, rows) -> the shard written there


def write_resumable(
    rows: Iterable[Row],
    out_dir: Path,
    samples_per_shard: int,
    run: Mapping[str, object],
    write_chunk: ChunkWriter,
    workers: int = 1,
    progress: bool = True,
) -> Dict[str, Any]:
    """Writes (or finishes) the set of `rows` in `out_dir`; `run` identifies input and settings (JSON
    values), `write_chunk` must be a module-level function (it is sent to worker processes). Returns the
    summary of _stats.json (its rejected rows are listed in the file only)."""
    if samples_per_shard < 1:
        raise ConfigError(f"samples per shard must be at least 1, not {samples_per_shard}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    staging = _start(out_dir, {**run, "samples_per_shard": samples_per_shard})
    with _Progress(progress) as bar:
        chunks = _write_missing(_chunks(rows, samples_per_shard), staging, write_chunk, workers, bar)
    if bar.kept:
        log.info("%s: kept %d finished shard(s) of an earlier run, wrote %d", out_dir, bar.kept, bar.written)
    return _finish(out_dir, staging, chunks)


def _start(out_dir: Path, run: Mapping[str, object]) -> Path:
    """The staging folder: new, or that of an unfinished run of the same input and settings."""
    staging = out_dir / STAGING
    if (out_dir / "_stats.json").exists():
        raise DataError(f"{out_dir} holds a finished shard set (_stats.json): choose another output, or delete it")
    # A run that finished no chunk (say it stopped on a wrong column name) has nothing to keep: start afresh.
    if (staging / "run.json").exists() and any(staging.glob("[0-9]*.json")):
        earlier = json.loads((staging / "run.json").read_text())
        changed = [
            f"{name}: {earlier.get(name)!r} there, {run.get(name)!r} now"
            for name in sorted(set(earlier) | set(run))
            if earlier.get(name) != run.get(name)
        ]
        if changed:
            raise DataError(
                f"{out_dir} holds an unfinished prep of other inputs or settings ({'; '.join(changed)}): "
                "rerun that command to finish it, or choose another output"
            )
        return staging
    if any(out_dir.glob("*.tar")) or (out_dir / "sizes.json").exists():
        raise DataError(f"{out_dir} holds shards but no {STAGING}/run.json to resume from: choose another output")
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / "run.json", dict(run))
    return staging


def _chunks(rows: Iterable[Row], size: int) -> Iterator[List[Row]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _shard(staging: Path, index: int) -> Path:
    return staging / f"{index:06d}.tar"


def _record(staging: Path, index: int) -> Path:
    return staging / f"{index:06d}.json"


def _write_chunk(write_chunk: ChunkWriter, staging: Path, index: int, rows: List[Row]) -> Tuple[int, int]:
    """In a worker: the chunk's shard, then its record (a record vouches for a complete shard)."""
    record = write_chunk(_shard(staging, index), rows)
    write_json(_record(staging, index), asdict(record))
    return record.rows, record.samples


def _finished(staging: Path, index: int, rows: int) -> bool:
    if not _record(staging, index).exists():
        return False
    recorded = json.loads(_record(staging, index).read_text())["rows"]
    if recorded != rows:
        raise DataError(
            f"{_record(staging, index)}: chunk {index} had {recorded} rows, the input now gives {rows}: "
            f"the input changed since the run began; delete {staging.parent} to start again"
        )
    return True


def _write_missing(
    chunks: Iterator[List[Row]], staging: Path, write_chunk: ChunkWriter, workers: int, bar: _Progress
) -> int:
    """Writes every chunk without a record; returns how many chunks the input has."""
    count = 0
    with _pool(workers) as pool:
        pending: Set[Future] = set()
        for index, rows in enumerate(chunks):
            count += 1
            if _finished(staging, index, len(rows)):
                bar.kept_chunk(len(rows))
                continue
            pending.add(pool.submit(_write_chunk, write_chunk, staging, index, rows))
            while len(pending) >= workers * CHUNKS_PER_WORKER:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                bar.written_chunks(future.result() for future in done)  # raises a worker's error here
        bar.written_chunks(future.result() for future in wait(pending).done)
    return count


class _InProcess(Executor):
    """One worker: each chunk written here, when submitted (nothing pickled; errors raised as they happen)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@contextmanager
def _pool(workers: int) -> Iterator[Executor]:
    if workers == 1:
        yield _InProcess()
        return
    # Forked workers share the parent's memory until they write to it, and a garbage collection in a
    # worker writes to every object it scans: frozen objects are never scanned, so stay shared.
    gc.freeze()
    pool = ProcessPoolExecutor(workers)
    try:
        yield pool
    finally:  # after an error, chunks not yet started are dropped: a rerun writes them
        pool.shutdown(cancel_futures=True)
        gc.unfreeze()


class _Progress:
    """A bar over input rows (rows/s) with the shards written and kept; off without a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(desc="prep", unit=" rows", dynamic_ncols=True, disable=None if enabled else True)
        self.kept = self.written = 0

    def kept_chunk(self, rows: int) -> None:
        self.kept += 1
        self._advance(rows)

    def written_chunks(self, results: Iterable[Tuple[int, int]]) -> None:
        for rows, _ in results:
            self.written += 1
            self._advance(rows)

    def _advance(self, rows: int) -> None:
        self.bar.update(rows)
        self.bar.set_postfix(shards=self.kept + self.written, refresh=False)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _finish(out_dir: Path, staging: Path, chunks: int) -> Dict[str, Any]:
    """Moves the shards holding samples to their final names in chunk order, then writes the index. A
    rerun after a crash in here redoes it: the final names depend on the records only."""
    if _record(staging, chunks).exists():
        raise DataError(
            f"{_record(staging, chunks)}: the input now has only {chunks} chunk(s); it changed since "
            f"the run began: delete {out_dir} to start again"
        )
    sizes: Dict[str, int] = {}
    total = ShardRecord(rows=0)
    rejected = 0
    for index in range(chunks):
        record = _read_record(staging, index)
        total.rows += record.rows
        rejected += len(record.rejected_inputs)
        for name, count in record.fields.items():
            total.fields[name] = total.fields.get(name, 0) + count
            total.field_bytes[name] = total.field_bytes.get(name, 0) + record.field_bytes[name]
        if record.samples:
            name = f"{len(sizes):06d}.tar"
            _move(_shard(staging, index), out_dir / name)
            sizes[name] = record.samples
    summary: Dict[str, Any] = {
        "samples": sum(sizes.values()),
        "shards": len(sizes),
        "fields": total.fields,
        "field_bytes": total.field_bytes,
        "rejected": rejected,
        "rows": total.rows,
    }
    rejected_inputs = (entry for index in range(chunks) for entry in _read_record(staging, index).rejected_inputs)
    write_index(out_dir, sizes, summary, rejected_inputs)
    shutil.rmtree(staging)
    return summary


def _read_record(staging: Path, index: int) -> ShardRecord:
    return ShardRecord(**json.loads(_record(staging, index).read_text()))


def _move(staged: Path, final: Path) -> None:
    if staged.exists():
        staged.replace(final)
    elif not final.exists():  # moved by an earlier, interrupted finish, or lost
        raise DataError(f"{staged}: missing, and not yet moved to {final}; delete {final.parent} to start again")
