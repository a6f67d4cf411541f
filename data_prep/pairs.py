"""Image and/or audio + caption samples from a folder or a CSV/JSONL/parquet manifest -> shards.

Folder: every image or audio file with a caption file of the same stem beside it (`cat.jpg` + `cat.txt`;
`cat.jpg`, `cat.flac` and `cat.txt` make one sample holding both), read one directory at a time.
Manifest: one row per sample with an image path and/or an audio path (relative to the manifest's
folder unless absolute) and a caption (and an optional key column), streamed (parquet by batches of
rows), so memory does not grow with its length. A caption value that is a list (JSONL, parquet) holds
several captions, written to `txt` one per line; optional columns of negative captions (`neg.txt`, one
per line) and of negative image paths (`neg.<ext>`, or `neg.0.<ext>`, `neg.1.<ext>`, ... for several),
the fields data.negatives reads. Rows whose media file (or negative image) is missing, unreadable,
outside the root, or whose caption is empty, and a key repeated within a shard's rows, are reported in
_stats.json and not written. Shards are written by `data_prep.parallel`: several processes, resumable.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import pyarrow.parquet as pq
from PIL import Image

from data_prep.negatives import swap_negatives
from data_prep.parallel import ShardRecord, write_resumable
from data_prep.writer import atomic_shard
from mmcl.data.decode import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, SampleError, decode_audio, numbered_field
from mmcl.errors import DataError

Media = Dict[str, Optional[Path]]  # "image" / "audio" -> file, or None when it lies outside the root


@dataclass(frozen=True)
class RowNegatives:
    """A row's own negatives: captions for `neg.txt`, image files (None: outside the root)."""

    captions: Tuple[str, ...] = ()
    images: Tuple[Optional[Path], ...] = ()


NO_NEGATIVES = RowNegatives()
# (source description, sample key, media files, captions one per line, the row's own negatives)
Pair = Tuple[str, str, Media, str, RowNegatives]
KINDS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS}
PARQUET_BATCH_ROWS = 4096  # parquet rows decoded at a time


@dataclass(frozen=True)
class PairSource:
    """The pairs of one input, and what identifies it (a resumed prep must see the same identity)."""

    identity: Dict[str, object]  # JSON values: the input's path and the settings that shape its pairs
    pairs: Iterable[Pair]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)


def sample_key(text: str) -> str:
    """A webdataset-safe key: no '.' or '/' (webdataset splits a member name on them)."""
    return text.replace("/", "__").replace(".", "_")


def _kind(path: Path) -> Optional[str]:
    extension = path.suffix.lower().lstrip(".")
    return next((kind for kind, extensions in KINDS.items() if extension in extensions), None)


def folder_pairs(root: Path) -> PairSource:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    return PairSource({"source": "folder", "input": str(root.resolve())}, _folder_pairs(root))


def _folder_pairs(root: Path) -> Iterator[Pair]:
    """Directory by directory, each in name order (a fixed order: a resumed prep cuts the same chunks);
    a stem's files share a directory, so only one directory's names are held at a time."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        by_stem: Dict[Path, Media] = {}
        for name in sorted(files):
            path = Path(directory) / name
            kind = _kind(path)
            if kind:
                by_stem.setdefault(path.with_suffix(""), {}).setdefault(kind, path)
        yield from (_folder_pair(root, stem, media) for stem, media in by_stem.items())


def _folder_pair(root: Path, stem: Path, media: Media) -> Pair:
    caption_file = Path(str(stem) + ".txt")  # "x.y.png" -> "x.y.txt"
    text = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else ""
    source = ", ".join(str(p.relative_to(root)) for p in media.values() if p)
    return source, sample_key(str(stem.relative_to(root))), media, text, NO_NEGATIVES


def manifest_rows(manifest: Path) -> Iterator[Dict[str, Any]]:
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    elif suffix in (".jsonl", ".json"):
        with open(manifest, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{manifest.name}:{number}: not a JSON object ({error.msg})") from None
    elif suffix == ".parquet":
        yield from _parquet_rows(manifest)
    else:
        raise DataError(f"unsupported manifest {manifest}: use .csv, .jsonl or .parquet")


def _parquet_rows(manifest: Path) -> Iterator[Dict[str, Any]]:
    """Batch by batch: one batch of rows decoded at a time. pre_buffer=False, because pyarrow's default
    pre-buffering reads the column chunks of every row group up front (memory grows with the file)."""
    try:
        for batch in pq.ParquetFile(manifest, pre_buffer=False).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{manifest}: not a readable parquet file ({error})") from None


@dataclass(frozen=True)
class ManifestColumns:
    """The column names a manifest is read by; negatives, negative_images: empty for none."""

    image: str = "image"
    caption: str = "caption"
    key: str = "key"
    audio: str = "audio"
    negatives: str = ""  # each row's negative captions: a list of strings, or a string of one per line
    negative_images: str = ""  # each row's negative image paths: one, or a list


def manifest_pairs(
    manifest: Path,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
    audio_column: str = "audio",
    negatives_column: str = "",
    negative_image_column: str = "",
) -> PairSource:
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such manifest")
    status = manifest.stat()
    identity: Dict[str, object] = {
        "source": "manifest",
        "input": str(manifest.resolve()),
        "bytes": status.st_size,  # an edited manifest is a different input: its chunks would not match
        "modified_ns": status.st_mtime_ns,
        "image_column": image_column,
        "caption_column": caption_column,
        "key_column": key_column,
        "audio_column": audio_column,
    }
    # Only when set, so a set written before these columns existed keeps its identity (and resumes).
    if negatives_column:
        identity["negatives_column"] = negatives_column
    if negative_image_column:
        identity["negative_image_column"] = negative_image_column
    columns = ManifestColumns(
        image_column, caption_column, key_column, audio_column, negatives_column, negative_image_column
    )
    return PairSource(identity, _manifest_pairs(manifest, columns))


def _one_line(text: str) -> str:
    """One caption on one line: `txt` and `neg.txt` hold one per line."""
    return " ".join(text.split())


def _strings(values: Iterable[Any]) -> List[str]:
    """A list cell's non-empty strings, each on one line (anything else in the list dropped)."""
    return [line for line in (_one_line(v) for v in values if isinstance(v, str)) if line]


def _captions(value: Any) -> str:
    """The caption cell as `txt`: a list is several captions, one per line; a string stays one caption
    (or several, if it spans several lines: a CSV cell can only hold a string)."""
    return "\n".join(_strings(value)) if isinstance(value, (list, tuple)) else str(value or "").strip()


def _negative_captions(value: Any) -> Tuple[str, ...]:
    """A list of strings, or a string of one per line; anything else (a missing value): none."""
    if isinstance(value, (list, tuple)):
        return tuple(_strings(value))
    return tuple(line.strip() for line in value.splitlines() if line.strip()) if isinstance(value, str) else ()


def _under_root(root: Path, value: Any) -> Optional[Path]:
    path = (root / str(value)).resolve()
    return path if root in path.parents else None


def _negatives(root: Path, row: Dict[str, Any], columns: ManifestColumns) -> RowNegatives:
    images = row.get(columns.negative_images) if columns.negative_images else None
    paths = images if isinstance(images, (list, tuple)) else [images]
    return RowNegatives(
        _negative_captions(row.get(columns.negatives)) if columns.negatives else (),
        tuple(_under_root(root, path) for path in paths if path not in (None, "")),
    )


def _manifest_pairs(manifest: Path, columns: ManifestColumns) -> Iterator[Pair]:
    root = manifest.parent.resolve()
    for number, row in enumerate(manifest_rows(manifest), start=1):
        source = f"{manifest.name}:{number}"
        kinds = {kind: column for kind, column in (("image", columns.image), ("audio", columns.audio)) if column in row}
        if columns.caption not in row or not kinds:
            raise DataError(
                f"{source}: manifest needs a caption column {columns.caption!r} and an {columns.image!r} "
                f"and/or {columns.audio!r} column, has {sorted(row)}"
            )
        if number == 1 and manifest.suffix.lower() in (".csv", ".parquet"):  # a JSONL row may omit a column
            missing = [c for c in (columns.negatives, columns.negative_images) if c and c not in row]
            if missing:
                raise DataError(f"{source}: manifest has no column {missing[0]!r}, has {sorted(row)}")
        media: Media = {}
        for kind, column in kinds.items():
            if row[column] not in (None, ""):
                media[kind] = _under_root(root, row[column])
        key = sample_key(str(row[columns.key])) if row.get(columns.key) not in (None, "") else f"{number:09d}"
        yield source, key, media, _captions(row[columns.caption]), _negatives(root, row, columns)


def _check(kind: str, path: Path) -> Optional[str]:
    """None if the file decodes as `kind`, else why not."""
    if kind == "audio":
        try:
            decode_audio(path.read_bytes())
            return None
        except SampleError as error:
            return str(error)
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except Exception as error:  # any failure means the file is not a usable image
        return f"unreadable image: {error}"


def _problem(key: str, media: Media, text: str, negatives: RowNegatives, shard_keys: Set[str]) -> Optional[str]:
    if key in shard_keys:
        return f"duplicate key {key!r}"
    if not media:
        return "no image or audio"
    for kind, path in media.items():
        if path is None:
            return f"{kind} path is outside the manifest's folder"
        if not path.exists():
            return f"missing {kind} {path}"
    if not text:
        return "empty caption"
    for kind, path in media.items():
        problem = _check(kind, path)  # type: ignore[arg-type]
        if problem:
            return problem
    for path in negatives.images:
        problem = _negative_image_problem(path)
        if problem:
            return problem
    return None


def _negative_image_problem(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return "negative image path is outside the manifest's folder"
    if not path.exists():
        return f"missing negative image {path}"
    if not path.suffix:
        return f"negative image {path} has no file extension (its field name needs one)"
    problem = _check("image", path)
    return f"negative image {path}: {problem}" if problem else None


def negative_image_fields(paths: Sequence[Path]) -> Dict[str, bytes]:
    """`neg.<ext>` for one file, `neg.0.<ext>`, `neg.1.<ext>`, ... for several (the fields
    data.negatives.image reads), each with its own file's extension, lowercased."""
    names = [f"neg.{path.suffix.lower().lstrip('.')}" for path in paths]
    if len(paths) > 1:
        names = [numbered_field(name, index) for index, name in enumerate(names)]
    return {name: path.read_bytes() for name, path in zip(names, paths, strict=True)}


def write_chunk(shard: Path, pairs: List[Pair], negatives: int = 0) -> ShardRecord:
    """One shard from one chunk of pairs (run in a worker process). Keys are checked within the shard:
    webdataset groups a tar's members by key, so a repeated key there would merge two samples.
    `negatives` > 0: up to that many swapped captions of the first caption in `neg.txt`, one per line
    (none: no field), unless the row brings negative captions of its own, which win."""
    record = ShardRecord(rows=len(pairs))
    shard_keys: Set[str] = set()
    with atomic_shard(shard) as tar:
        for source, key, media, text, own in pairs:
            problem = _problem(key, media, text, own, shard_keys)
            if problem:
                record.reject(source, problem)
                continue
            shard_keys.add(key)
            sample: Dict[str, Any] = {"__key__": key, "txt": text}
            negative_captions = list(own.captions)
            if not negative_captions and negatives:
                negative_captions = swap_negatives(text.split("\n")[0], negatives)
            if negative_captions:
                sample["neg.txt"] = "\n".join(negative_captions)
            sample.update(negative_image_fields([path for path in own.images if path]))  # all checked above
            for path in media.values():
                sample[path.suffix.lower().lstrip(".")] = path.read_bytes()  # type: ignore[union-attr]
            tar.write(sample)
            record.add(sample)
    return record


def write_pairs(
    pairs: PairSource,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    progress: bool = True,
    workers: int = 1,
    negatives: int = 0,
) -> Dict[str, Any]:
    """Shards of `pairs` in `out_dir` (see data_prep.parallel: `workers` processes; a rerun of the same
    input and settings finishes an interrupted set). `negatives` > 0: each sample also holds up to that
    many rule-based negative captions (data_prep.negatives) in `neg.txt`, one per line; a caption no swap
    changes gets none. Returns the summary of _stats.json; the rejected rows are listed in the file."""
    if negatives < 0:
        raise DataError(f"negatives per caption must be at least 0, not {negatives}")
    identity = {**pairs.identity, "negatives": negatives} if negatives else pairs.identity
    writer = partial(write_chunk, negatives=negatives) if negatives else write_chunk
    return write_resumable(pairs, Path(out_dir), samples_per_shard, identity, writer, workers, progress)
