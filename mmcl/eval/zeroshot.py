"""Zero-shot evaluation of a trained model on one dataset in the CLIP_benchmark layout:

<root>/classnames.txt                               one class name per line, in label order
<root>/zeroshot_classification_templates.txt       prompt templates with "{c}"
<root>/test/*.tar                                   shards with a ".cls" label and an image and/or
                                                    audio, optional ".txt" caption
<root>/dataset.json                                 optional: {"retrieval_match": "class"} when the
                                                    items of a sample share only their class
"""

from __future__ import annotations

import json
import tarfile
from itertools import combinations
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence

import torch
from tqdm import tqdm

from mmcl.data import InputSpec, build_eval_loader
from mmcl.eval.metrics import classification_metrics, recall_at_k
from mmcl.models import MultiEncoder

TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def read_lines(path: Path) -> List[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def class_embeddings(model: MultiEncoder, tokenize: Callable[[str], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str], device: torch.device) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its normalised prompt embeddings (CLIP's ensemble)."""
    rows = []
    for name in classnames:
        tokens = torch.stack([tokenize(t.replace("{c}", name)) for t in templates]).to(device)  # (T, L)
        prompt_emb = model.encode("text", tokens)  # (T, D)
        rows.append(torch.nn.functional.normalize(prompt_emb.mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, D)


def _sample_fields(shard: str) -> set:
    """Extensions present in the first sample of a shard, to know whether captions exist."""
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers()[:16]]
    first = names[0].split(".", 1)[0]
    return {n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == first}


def check_dataset(root: str | Path) -> None:
    """Fail early, naming what is missing, when `root` is not a dataset in the layout above."""
    root = Path(root)
    for required in ("classnames.txt", TEMPLATES_FILE):
        if not (root / required).is_file():
            raise FileNotFoundError(f"evaluation dataset {root}: no {required}")
    if not any((root / "test").glob("*.tar")):
        raise FileNotFoundError(f"evaluation dataset {root}: no shards in {root / 'test'}")


def dataset_options(root: Path) -> Dict[str, object]:
    """dataset.json, if present: {"retrieval_match": "sample" (default) | "class"}."""
    path = root / "dataset.json"
    options = json.loads(path.read_text()) if path.is_file() else {}
    if options.get("retrieval_match", "sample") not in ("sample", "class"):
        raise ValueError(f"{path}: retrieval_match must be 'sample' or 'class'")
    return options


@torch.no_grad()
def evaluate_dataset(model: MultiEncoder, root: str | Path, batch_size: int, device: torch.device,
                     recall_k: Sequence[int], fields: Mapping[str, str], progress: bool = True) -> Dict[str, object]:
    """Zero-shot classification of every non-text modality the shards hold (and the model embeds),
    and retrieval recall@k in both directions for every pair of those modalities and captions.

    `fields`: modality -> ";"-separated shard fields (the training config's data.fields).
    Image metrics keep CLIP_benchmark's names (top1, text_retrieval_recall@k = image -> caption, ...);
    other modalities' are prefixed ("audio_top1", "audio_to_image_recall@k").
    """
    root = Path(root)
    classnames = read_lines(root / "classnames.txt")
    templates = read_lines(root / TEMPLATES_FILE)
    shards = sorted(str(p) for p in (root / "test").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards under {root / 'test'}")
    by_class = dataset_options(root).get("retrieval_match") == "class"
    preprocess = model.preprocessors(train=False)
    in_shards = _sample_fields(shards[0])
    inputs = {"label": InputSpec("label", ["cls"], torch.tensor)}
    for modality in model.modalities:
        present = [f for f in fields.get(modality, "").split(";") if f in in_shards]
        if present:
            inputs[modality] = InputSpec(model.tower(modality).input_kind, present, preprocess[modality])
    modalities = [m for m in inputs if m != "label"]
    if not [m for m in modalities if m != "text"]:
        raise ValueError(f"{root}: its shards hold none of the fields of the model's non-text towers ({fields})")

    model.eval()
    embedded: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    labels, skipped = [], 0
    loader = build_eval_loader("::".join(shards), inputs, batch_size)
    for batch in tqdm(loader, desc=f"eval {root.name}", disable=not progress, leave=False):
        for m in modalities:
            embedded[m].append(model.encode(m, batch.inputs[m].to(device)).float().cpu())
        labels.append(batch.inputs["label"])
        skipped += batch.skipped
    emb = {m: torch.cat(parts) for m, parts in embedded.items()}  # modality -> (N, D)
    targets = torch.cat(labels)  # (N,)

    classifier = class_embeddings(model, preprocess["text"], classnames, templates, device).float().cpu()  # (C, D)
    metrics: Dict[str, object] = {}
    for m in modalities:
        if m != "text":
            logits = emb[m] @ classifier.T  # (N, D) x (D, C) -> (N, C)
            for name, value in classification_metrics(logits, targets, len(classnames)).items():
                metrics[_metric_name(m, name)] = value
    match = targets if by_class else None
    for query, gallery in combinations(modalities, 2):
        for q, g in ((query, gallery), (gallery, query)):
            for k, value in recall_at_k(emb[q], emb[g], recall_k, match).items():
                metrics[_retrieval_name(q, g, k)] = value
    metrics.update(dataset=root.name, samples=len(targets), classes=len(classnames), skipped=skipped,
                   retrieval_match="class" if by_class else "sample")
    return metrics


def _metric_name(modality: str, name: str) -> str:
    return name if modality == "image" else f"{modality}_{name}"


def _retrieval_name(query: str, gallery: str, k: int) -> str:
    if {query, gallery} == {"image", "text"}:  # CLIP_benchmark's names: named after what is retrieved
        return f"{gallery}_retrieval_recall@{k}"
    return f"{query}_to_{gallery}_recall@{k}"
