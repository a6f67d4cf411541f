"""A real image-caption set from Debian's Open Clip Art Library package (openclipart-svg).

Every drawing carries metadata written by the person who drew it: a title and keywords (Dublin Core
in the SVG). Each drawing becomes a PNG (rasterised by librsvg's rsvg-convert) with the caption
"<title>: <keywords>", and its library category (animals, food, tools, ...) as the class, so the set
serves both caption retrieval and zero-shot classification. Drawings without a usable title are
rejected and listed in _stats.json.

<out>/train/ and <out>/test/ (a seeded, stratified split), classnames.txt, templates: the
CLIP_benchmark layout.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from data_prep.writer import ShardSetWriter

SVG_ROOT = Path("/usr/share/openclipart/svg")
NAMESPACES = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
GENERIC_TITLES = {"", "open clip art library", "untitled", "none"}
TEMPLATES = ["clip art of {c}.", "a drawing of {c}.", "an illustration of {c}.", "{c}."]


def caption(svg: Path) -> Optional[str]:
    """'<title>: <keyword>, <keyword>' from the drawing's own metadata, or None when it has no title."""
    try:
        # cc:Work, under either of the two Creative Commons namespaces the library's files use.
        work = next((e for e in ElementTree.parse(svg).getroot().iter() if str(e.tag).endswith("}Work")), None)
    except ElementTree.ParseError:
        return None
    if work is None:
        return None
    title = (work.findtext("dc:title", "", NAMESPACES) or "").strip()
    if title.lower() in GENERIC_TITLES:
        return None
    creators = {(t.text or "").strip().lower() for t in work.findall("dc:creator//dc:title", NAMESPACES)}
    keywords = [(li.text or "").strip() for li in work.findall("dc:subject//rdf:li", NAMESPACES)]
    keywords = [k for k in dict.fromkeys(keywords) if k and k.lower() not in creators and k.lower() != title.lower()]
    return f"{title}: {', '.join(keywords[:8])}" if keywords else title


def rasterise(svg: Path, size: int, binary: str) -> bytes:
    """A size x size PNG: the drawing scaled to fit (aspect kept), centred on white."""
    png = subprocess.run(
        [
            binary,
            "--width",
            str(size),
            "--height",
            str(size),
            "--keep-aspect-ratio",
            "--background-color",
            "white",
            str(svg),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    with Image.open(io.BytesIO(png)) as drawing:
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(drawing.convert("RGB"), ((size - drawing.width) // 2, (size - drawing.height) // 2))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def drawings(root: Path) -> List[Tuple[str, Path]]:
    """(category, file) for every drawing, each file once (the package links some into several folders)."""
    seen, out = set(), []
    for svg in sorted(root.glob("*/**/*.svg")):
        real = svg.resolve()
        if svg.is_symlink() or real in seen:
            continue
        seen.add(real)
        out.append((svg.relative_to(root).parts[0], svg))
    return out


def prepare_openclipart(
    out_dir: str | Path,
    limit: int = 0,
    size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    root: Path = SVG_ROOT,
    workers: int = 4,
    samples_per_shard: int = 1000,
) -> Dict[str, Any]:
    binary = shutil.which("rsvg-convert")
    if not root.is_dir() or binary is None:
        raise FileNotFoundError(
            "needs Debian's openclipart-svg and librsvg2-bin: apt-get install openclipart-svg "
            "librsvg2-bin (scripts/env.sh installs them when run as root)"
        )
    rng = random.Random(seed)
    found = drawings(root)
    rng.shuffle(found)
    categories = sorted({category for category, _ in found})
    rejected: List[Tuple[str, str]] = []
    chosen: List[Tuple[str, Path, str]] = []
    for category, svg in found:
        text = caption(svg)
        if text is None:
            rejected.append((str(svg), "no title in its metadata"))
        else:
            chosen.append((category, svg, text))
        if limit and len(chosen) >= limit:
            break

    def render(item: Tuple[str, Path, str]) -> Optional[bytes]:
        try:
            return rasterise(item[1], size, binary)
        except (subprocess.SubprocessError, OSError, ValueError):
            return None

    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(render, chosen))
    by_category: Dict[str, List[dict]] = {c: [] for c in categories}
    for (category, svg, text), png in zip(chosen, images, strict=True):
        if not png:
            rejected.append((str(svg), "rsvg-convert could not render it"))
            continue
        key = "_".join(svg.relative_to(root).with_suffix("").parts).replace(".", "_")
        by_category[category].append({"__key__": key, "png": png, "txt": text, "cls": str(categories.index(category))})
    splits: Dict[str, List[Dict[str, Any]]] = {"train": [], "test": []}
    for samples in by_category.values():  # stratified: every category split in the same proportion
        cut = round(len(samples) * test_fraction)
        splits["test"] += samples[:cut]
        splits["train"] += samples[cut:]
    out_dir = Path(out_dir)
    sizes = {}
    for split, samples in splits.items():
        rng.shuffle(samples)
        with ShardSetWriter(out_dir / split, samples_per_shard, clip_benchmark_names=split == "test") as writer:
            for sample in samples:
                writer.write(sample)
            for source, reason in rejected if split == "train" else []:
                writer.reject(source, reason)
            writer.extra_stats = {"source": f"Debian openclipart-svg ({root})", "size": size}
        sizes[split] = writer.sizes
    (out_dir / "classnames.txt").write_text("\n".join(c.replace("_", " ") for c in categories) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {"train": sizes["train"], "test": sizes["test"], "rejected": len(rejected), "classes": len(categories)}
