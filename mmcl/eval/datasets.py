"""Evaluation datasets on disk, in either of two layouts, read into one shape (`EvalSet`).

CLIP_benchmark's webdataset layout (what data_prep writes for the bundled sets):

    <root>/classnames.txt                           one class name per line, in label order
    <root>/zeroshot_classification_templates.txt    prompt templates with "{c}"
    <root>/test/{0..N}.tar, test/nshards.txt        shards: ".cls" label, an image and/or audio, optional ".txt"
                                                    (without nshards.txt: every test/*.tar)
    <root>/dataset_type.txt                         optional: "retrieval" for a set without classes, whose
                                                    ".txt" holds several captions of the image, one per line;
                                                    "caption_choice" for a set of images, each with its true
                                                    caption(s) in ".txt" and wrong ones in ".neg.txt", one per
                                                    line (SugarCrepe's and ARO's task)
    <root>/<split>/{0..N}.tar                       optional: a labelled split (e.g. train/) the few-shot
                                                    linear probe learns from
    <root>/dataset.json                             optional: {"retrieval_match": "class"} when the items
                                                    of a sample share only their class

A ".txt" field is one or more captions, one per line, in every layout: a query image is retrieved by
any of its captions, as CLIP_benchmark scores COCO and Flickr.

An mmcl shard set as data_prep writes it from folders and manifests (<root>/*.tar + sizes.json, no
classes): retrieval between the modalities its samples hold (images or audio and captions).

A plain folder per class (ImageNet-style): <root>/<class name>/<file>.{png,jpg,...,wav,flac,...}; the
class names are the folder names (underscores read as spaces) unless classnames.txt gives them in
folder order; templates come from the templates file when present, else CLIP's short ensemble.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Set

from mmcl.data.decode import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS
from mmcl.errors import DataError

TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_TEMPLATES = [
    "a photo of a {c}.",
    "a bad photo of a {c}.",
    "a photo of the large {c}.",
    "a photo of the small {c}.",
    "a drawing of a {c}.",
    "a recording of a {c}.",
    "{c}.",
]


def read_lines(path: Path) -> List[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# The field of a caption-choice sample holding its wrong captions, one per line (data.negatives' layout).
NEGATIVES_FIELD = "neg.txt"
TASKS = ("classification", "retrieval", "caption_choice")


@dataclass
class EvalSet:
    name: str
    classnames: List[str]
    templates: List[str]
    fields: Set[str]  # the fields its samples hold ("png", "flac", "txt", ...)
    retrieval_match: str  # "sample" or "class"
    shards: List[str]  # empty for a folder dataset
    # Folder layout: webdataset-style sample dicts, each with its file's "__index__"; only the files whose
    # index `keep` accepts are read (a process reads its own share).
    folder_samples: Callable[..., Iterator[dict]]
    root: Path = Path(".")
    task: str = "classification"  # one of TASKS; a set without classes is scored by retrieval

    def labelled_split(self, split: str) -> List[str]:
        """The shards of <root>/<split>/ when its samples hold class labels (what a few-shot probe
        learns from), else no shard."""
        shards = split_shards(self.root / split)
        return shards if shards and "cls" in _first_sample_fields(shards[0]) else []


def _first_sample_fields(shard: str) -> Set[str]:
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers()[:16]]
    first = names[0].split(".", 1)[0]
    return {n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == first}


def split_shards(split_dir: Path) -> List[str]:
    """A split's shards in order: {0..N-1}.tar as nshards.txt counts them (CLIP_benchmark), else every
    *.tar, numbered names in numeric order."""
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not text.isdigit():
            raise DataError(f"{count_file}: not a shard count: {text!r}")
        shards = [split_dir / f"{i}.tar" for i in range(int(text))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"{count_file} counts {text} shards, but {missing[0]} does not exist")
        return [str(s) for s in shards]
    found = split_dir.glob("*.tar") if split_dir.is_dir() else iter(())
    return [
        str(p)
        for p in sorted(found, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name))
    ]


def _dataset_type(root: Path) -> str:
    path = root / "dataset_type.txt"
    kind = path.read_text().strip().lower() if path.is_file() else "classification"
    if kind not in TASKS:
        raise DataError(f"{path}: dataset type {kind!r} is not supported ({', '.join(TASKS)})")
    return kind


def _class_folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and p.name != "test")


def check_dataset(root: str | Path) -> None:
    """Fail early, naming what is missing, when `root` is in neither layout."""
    load_dataset(root)


def load_dataset(root: str | Path) -> EvalSet:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation dataset {root}: no such directory")
    options = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    match = options.get("retrieval_match", "sample")
    if match not in ("sample", "class"):
        raise DataError(f"{root / 'dataset.json'}: retrieval_match must be 'sample' or 'class'")
    templates = read_lines(root / TEMPLATES_FILE) if (root / TEMPLATES_FILE).is_file() else None
    shards = split_shards(root / "test")
    if shards:
        task = _dataset_type(root)
        if task != "classification":
            if match == "class":
                raise DataError(f"{root}: retrieval_match 'class' needs class labels, which a {task} set lacks")
            fields = _first_sample_fields(shards[0])
            if task == "caption_choice" and not {"txt", NEGATIVES_FIELD} <= fields:
                raise DataError(
                    f"{root}: a caption_choice set's samples hold their true captions in .txt and the wrong ones "
                    f"in .{NEGATIVES_FIELD}; its first sample holds {sorted(fields)}"
                )
            return EvalSet(root.name, [], [], fields, match, shards, lambda keep=None: iter(()), root, task)
        for required in ("classnames.txt", TEMPLATES_FILE):
            if not (root / required).is_file():
                raise FileNotFoundError(f"evaluation dataset {root}: no {required}")
        return EvalSet(
            root.name,
            read_lines(root / "classnames.txt"),
            templates or [],
            _first_sample_fields(shards[0]),
            match,
            shards,
            lambda keep=None: iter(()),
            root,
        )
    own_shards = sorted(str(p) for p in root.glob("*.tar"))
    if own_shards:
        if match == "class":
            raise DataError(f"{root}: retrieval_match 'class' needs class labels, which a plain shard set lacks")
        classnames = read_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else []
        return EvalSet(
            root.name,
            classnames,
            templates or DEFAULT_TEMPLATES,
            _first_sample_fields(own_shards[0]),
            match,
            own_shards,
            lambda keep=None: iter(()),
            root,
            "classification" if classnames else "retrieval",
        )
    folders = _class_folders(root)
    if not folders:
        raise FileNotFoundError(
            f"evaluation dataset {root}: neither shards (in {root / 'test'} or {root}) nor class folders"
        )
    classnames = (
        read_lines(root / "classnames.txt")
        if (root / "classnames.txt").is_file()
        else [f.name.replace("_", " ") for f in folders]
    )
    if len(classnames) != len(folders):
        raise DataError(f"evaluation dataset {root}: {len(classnames)} class names for {len(folders)} folders")
    known = IMAGE_EXTENSIONS | AUDIO_EXTENSIONS
    files = [
        (label, path)
        for label, folder in enumerate(folders)
        for path in sorted(folder.iterdir())
        if path.suffix[1:].lower() in known
    ]
    if not files:
        raise FileNotFoundError(f"evaluation dataset {root}: no image or audio files in its class folders")

    def samples(keep: Callable[[int], bool] = lambda index: True) -> Iterator[dict]:
        for index, (label, path) in enumerate(files):
            if keep(index):
                yield {
                    "__key__": f"{path.parent.name}/{path.stem}",
                    "__url__": str(root),
                    "__index__": index,
                    path.suffix[1:].lower(): path.read_bytes(),
                    "cls": str(label).encode(),
                }

    fields = {path.suffix[1:].lower() for _, path in files} | {"cls"}
    return EvalSet(root.name, classnames, templates or DEFAULT_TEMPLATES, fields, match, [], samples, root)
