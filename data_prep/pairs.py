"""Image and/or audio + caption samples from a folder or a CSV/JSONL/parquet manifest -> shards.

Folder: every image or audio file with a caption file of the same stem beside it (`cat.jpg` + `cat.txt`;
`cat.jpg`, `cat.flac` and `cat.txt` make one sample holding both).
Manifest: one row per sample with an image path and/or an audio path (relative to the manifest's
folder unless absolute) and a caption (and an optional key column). Rows whose media file is missing,
unreadable, outside the root, or whose caption is empty, and duplicate keys, are reported in
_stats.json and not written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data_prep.writer import ShardSetWriter
from mmcl.data.decode import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, SampleError, decode_audio
from mmcl.errors import DataError

Media = Dict[str, Optional[Path]]  # "image" / "audio" -> file, or None when it lies outside the root
Pair = Tuple[str, str, Media, str]  # (source description, sample key, media files, caption)
KINDS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS}


def sample_key(text: str) -> str:
    """A webdataset-safe key: no '.' or '/' (webdataset splits a member name on them)."""
    return text.replace("/", "__").replace(".", "_")


def _kind(path: Path) -> Optional[str]:
    extension = path.suffix.lower().lstrip(".")
    return next((kind for kind, extensions in KINDS.items() if extension in extensions), None)


def folder_pairs(root: Path) -> Iterator[Pair]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    by_stem: Dict[Path, Media] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _kind(p)):
        by_stem.setdefault(path.with_suffix(""), {}).setdefault(_kind(path), path)  # type: ignore[arg-type]
    for stem, media in by_stem.items():
        caption_file = Path(str(stem) + ".txt")  # "x.y.png" -> "x.y.txt"
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else ""
        relative = stem.relative_to(root)
        yield ", ".join(str(p.relative_to(root)) for p in media.values() if p), sample_key(str(relative)), media, text


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
        try:
            table = pq.read_table(manifest)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{manifest}: not a readable parquet file ({error})") from None
        yield from table.to_pylist()
    else:
        raise DataError(f"unsupported manifest {manifest}: use .csv, .jsonl or .parquet")


def manifest_pairs(
    manifest: Path,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
    audio_column: str = "audio",
) -> Iterator[Pair]:
    root = manifest.parent.resolve()
    for number, row in enumerate(manifest_rows(manifest), start=1):
        source = f"{manifest.name}:{number}"
        columns = {kind: column for kind, column in (("image", image_column), ("audio", audio_column)) if column in row}
        if caption_column not in row or not columns:
            raise DataError(
                f"{source}: manifest needs a caption column {caption_column!r} and an {image_column!r} "
                f"and/or {audio_column!r} column, has {sorted(row)}"
            )
        media: Media = {}
        for kind, column in columns.items():
            if row[column] not in (None, ""):
                path = (root / str(row[column])).resolve()
                media[kind] = path if root in path.parents else None
        key = sample_key(str(row[key_column])) if row.get(key_column) not in (None, "") else f"{number:09d}"
        yield source, key, media, str(row[caption_column] or "").strip()


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


def _problem(key: str, media: Media, text: str, writer: ShardSetWriter) -> Optional[str]:
    if writer.has_key(key):
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
    return None


def write_pairs(
    pairs: Iterator[Pair], out_dir: str | Path, samples_per_shard: int = 1000, progress: bool = True
) -> Dict[str, Any]:
    with ShardSetWriter(out_dir, samples_per_shard) as writer:
        for source, key, media, text in tqdm(pairs, desc="prep", unit=" samples", disable=not progress):
            problem = _problem(key, media, text, writer)
            if problem:
                writer.reject(source, problem)
                continue
            sample: Dict[str, Any] = {"__key__": key, "txt": text}
            for path in media.values():
                sample[path.suffix.lower().lstrip(".")] = path.read_bytes()
            writer.write(sample)
    return writer.stats
