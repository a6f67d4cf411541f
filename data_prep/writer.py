"""ShardSetWriter: samples -> {000000..N}.tar with sizes.json (samples per shard) and _stats.json.

An evaluation split in CLIP_benchmark's webdataset layout (`clip_benchmark_names=True`) is named
{0..N}.tar instead, with nshards.txt beside it, as CLIP_benchmark's `wds/` loader reads it.

Each shard is written under a temporary name and renamed when complete, so a directory never holds a
half-written shard under a final name; sizes.json and _stats.json are written last, and their
presence marks a finished shard set. `atomic_shard` and `write_index` are the same steps for writers
that manage shards themselves (data_prep/parallel.py).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import webdataset as wds

from mmcl.errors import DataError


class ShardSetWriter:
    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000, clip_benchmark_names: bool = False) -> None:
        if samples_per_shard < 1:
            raise DataError("samples_per_shard must be at least 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.clip_benchmark_names = clip_benchmark_names
        self.sizes: Dict[str, int] = {}
        self.field_counts: Counter = Counter()
        self.field_bytes: Counter = Counter()
        self.rejected: List[Dict[str, str]] = []
        self.extra_stats: Dict[str, object] = {}
        self._tar: Optional[wds.TarWriter] = None
        self._name = ""
        self._keys: set = set()
        self.stats: Dict[str, object] = {}

    def _open_next(self) -> None:
        self._name = f"{len(self.sizes)}.tar" if self.clip_benchmark_names else f"{len(self.sizes):06d}.tar"
        self.sizes[self._name] = 0
        self._tar = tar_writer(self.out_dir / (self._name + ".tmp"))

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
            self._tar = None

    def has_key(self, key: str) -> bool:
        return key in self._keys

    def write(self, sample: Dict[str, Any]) -> None:
        """`sample` has "__key__" and field -> bytes/str; keys must be unique within the set."""
        key = str(sample["__key__"])
        if key in self._keys:
            raise DataError(f"duplicate sample key {key!r}")
        if "." in key or "/" in key:
            raise DataError(f"sample key {key!r} may not contain '.' or '/' (webdataset splits fields on them)")
        self._keys.add(key)
        if self._tar is None or self.sizes[self._name] >= self.samples_per_shard:
            self._close_current()
            self._open_next()
        assert self._tar is not None
        self._tar.write(sample)
        self.sizes[self._name] += 1
        for field, value in sample.items():
            if not field.startswith("__"):
                self.field_counts[field] += 1
                self.field_bytes[field] += len(value) if isinstance(value, (bytes, str)) else 0

    def reject(self, source: str, reason: str) -> None:
        """Record an input that was not written, for _stats.json."""
        self.rejected.append({"source": source, "reason": reason})

    def close(self) -> Dict[str, object]:
        self._close_current()
        summary = {
            "samples": sum(self.sizes.values()),
            "shards": len(self.sizes),
            "fields": dict(self.field_counts),
            "field_bytes": dict(self.field_bytes),
            "rejected": len(self.rejected),
            **self.extra_stats,
        }
        if self.clip_benchmark_names:
            (self.out_dir / "nshards.txt").write_text(f"{len(self.sizes)}\n")
        write_index(self.out_dir, self.sizes, summary, self.rejected)
        self.stats = {**summary, "rejected_inputs": self.rejected}
        return self.stats

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # failed: leave no shard and no sizes.json that look finished
            self._tar.close()
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)


def tar_writer(path: Path) -> wds.TarWriter:
    # Whole seconds: a fractional mtime (the writer's default, time.time()) gives every member a PAX
    # header of its own, and every reader then parses two headers per file (a third of a tiny-image
    # loader's time went to tar headers).
    return wds.TarWriter(str(path), mtime=int(time.time()))


@contextmanager
def atomic_shard(path: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on `path`'s temporary name, renamed to `path` when the block completes; if the block
    fails the temporary file is removed, so `path` never names a half-written shard."""
    temporary = path.with_name(path.name + ".tmp")
    tar = tar_writer(temporary)
    try:
        yield tar
    except BaseException:
        tar.close()
        temporary.unlink(missing_ok=True)
        raise
    tar.close()
    os.replace(temporary, path)


def write_json(path: Path, value: object) -> None:
    """`path` holds all of `value` or, after a crash, whatever it held before: never a truncated file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(temporary, path)


def write_index(
    out_dir: Path, sizes: Mapping[str, int], summary: Mapping[str, object], rejected: Iterable[Mapping[str, str]]
) -> None:
    """sizes.json, then _stats.json: `summary` and every rejected input, one per line. The rejected inputs
    are streamed from an iterable, so a set with millions of them is written without holding them all.
    _stats.json comes last and whole (renamed into place): its presence marks a finished set."""
    write_json(out_dir / "sizes.json", dict(sizes))
    temporary = out_dir / "_stats.json.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write("{\n")
        for name, value in summary.items():
            handle.write(f" {json.dumps(name)}: {json.dumps(value)},\n")
        handle.write(' "rejected_inputs": [')
        for number, entry in enumerate(rejected):
            handle.write(("," if number else "") + "\n  " + json.dumps(entry))
        handle.write("\n ]\n}\n")
    os.replace(temporary, out_dir / "_stats.json")


def brace_pattern(out_dir: str | Path, shards: int) -> str:
    """The brace URL naming every shard of a finished set, for data.train."""
    return f"{Path(out_dir)}/{{000000..{shards - 1:06d}}}.tar"
