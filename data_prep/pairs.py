"""Image + caption pairs from a folder or a CSV/JSONL/parquet manifest -> shards.

Folder: every image file with a caption file of the same stem beside it (`cat.jpg` + `cat.txt`).
Manifest: one row per sample with an image path (relative to the manifest's folder unless absolute)
and a caption (and an optional key column). Rows whose image is missing, unreadable, outside the root, or whose caption is empty,
and duplicate keys, are reported in _stats.json and not written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data_prep.writer import ShardSetWriter
from mmcl.data.decode import IMAGE_EXTENSIONS

Pair = Tuple[str, str, Optional[Path], str]  # (source description, sample key, image path or None, caption)


def sample_key(text: str) -> str:
    """A webdataset-safe key: no '.' or '/' (webdataset splits a member name on them)."""
    return text.replace("/", "__").replace(".", "_")


def folder_pairs(root: Path) -> Iterator[Pair]:
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
        caption_file = image.with_suffix(".txt")
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else ""
        relative = str(image.relative_to(root))
        yield relative, sample_key(str(image.relative_to(root).with_suffix(""))), image, text


def manifest_rows(manifest: Path) -> Iterator[Dict[str, object]]:
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    elif suffix in (".jsonl", ".json"):
        with open(manifest, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".parquet":
        yield from pq.read_table(manifest).to_pylist()
    else:
        raise ValueError(f"unsupported manifest {manifest}: use .csv, .jsonl or .parquet")


def manifest_pairs(manifest: Path, image_column: str = "image", caption_column: str = "caption",
                   key_column: str = "key") -> Iterator[Pair]:
    root = manifest.parent.resolve()
    for number, row in enumerate(manifest_rows(manifest), start=1):
        source = f"{manifest.name}:{number}"
        if image_column not in row or caption_column not in row:
            raise KeyError(f"{source}: manifest needs columns {image_column!r} and {caption_column!r}, has {sorted(row)}")
        path = (root / str(row[image_column])).resolve()
        inside = root in path.parents
        key = sample_key(str(row[key_column])) if row.get(key_column) not in (None, "") else f"{number:09d}"
        yield source, key, path if inside else None, str(row[caption_column] or "").strip()


def _check_image(path: Path) -> Optional[str]:
    """None if Pillow can read the file, else why not."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except Exception as error:  # any failure means the file is not a usable image
        return f"unreadable image: {error}"


def write_pairs(pairs: Iterator[Pair], out_dir: str | Path, samples_per_shard: int = 1000,
                progress: bool = True) -> Dict[str, object]:
    with ShardSetWriter(out_dir, samples_per_shard) as writer:
        for source, key, path, text in tqdm(pairs, desc="prep", unit=" samples", disable=not progress):
            if writer.has_key(key):
                writer.reject(source, f"duplicate key {key!r}")
                continue
            if path is None:
                writer.reject(source, "image path is outside the manifest's folder")
                continue
            if not path.exists():
                writer.reject(source, f"missing image {path}")
                continue
            if not text:
                writer.reject(source, "empty caption")
                continue
            problem = _check_image(path)
            if problem:
                writer.reject(source, problem)
                continue
            extension = path.suffix.lower().lstrip(".")
            writer.write({"__key__": key, extension: path.read_bytes(), "txt": text})
    return writer.stats
