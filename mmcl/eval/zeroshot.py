"""Zero-shot evaluation of a model on one dataset (layouts: datasets.py): classification of every
non-text modality by prompt ensembles, a linear probe on the frozen embeddings, and recall@k in both
directions for every pair of modalities."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from tqdm import tqdm

from mmcl.config import parse_fields
from mmcl.data import InputSpec, batches_from_samples, build_eval_loader
from mmcl.errors import DataError
from mmcl.eval.datasets import load_dataset
from mmcl.eval.linear_probe import linear_probe
from mmcl.eval.metrics import classification_metrics, confusion_matrix, recall_at_k
from mmcl.models import MultiEncoder


@torch.no_grad()
def class_embeddings(
    model: MultiEncoder,
    tokenize: Callable[[str], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its normalised prompt embeddings (CLIP's ensemble)."""
    rows = []
    for name in classnames:
        tokens = torch.stack([tokenize(t.replace("{c}", name)) for t in templates]).to(device)  # (T, L)
        prompt_emb = model.encode("text", tokens)  # (T, D)
        rows.append(torch.nn.functional.normalize(prompt_emb.mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, D)


@dataclass
class DatasetResult:
    metrics: Dict[str, Any]
    classnames: List[str]
    confusion: Dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (C, C) counts


@torch.no_grad()
def evaluate_dataset(
    model: MultiEncoder,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    recall_k: Sequence[int],
    fields: Mapping[str, str],
    progress: bool = True,
    probe: bool = True,
) -> DatasetResult:
    """Zero-shot classification of every non-text modality the shards hold (and the model embeds),
    and retrieval recall@k in both directions for every pair of those modalities and captions.

    `fields`: modality -> ";"-separated shard fields (the training config's data.fields).
    Image metrics keep CLIP_benchmark's names (acc1, text_retrieval_recall@k = image -> caption, ...);
    other modalities' are prefixed ("audio_acc1", "audio_to_image_recall@k").
    """
    dataset = load_dataset(root)
    preprocess = model.preprocessors(train=False)
    classify = bool(dataset.classnames)  # a plain mmcl shard set has captions but no classes
    inputs = {"label": InputSpec("label", ["cls"], torch.tensor)} if classify else {}
    for modality in model.modalities:
        present = [f for f in parse_fields(fields.get(modality, "")) if f in dataset.fields]
        if present:
            inputs[modality] = InputSpec(model.tower(modality).input_kind, present, preprocess[modality])
    modalities = [m for m in inputs if m != "label"]
    if not [m for m in modalities if m != "text"] or (not classify and len(modalities) < 2):
        raise DataError(
            f"{root}: nothing to evaluate: its samples hold {sorted(dataset.fields)}, the model's "
            f"towers read {dict(fields)}{'' if classify else ', and it has no classnames.txt'}"
        )

    model.eval()
    embedded: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    labels, skipped = [], 0
    if dataset.shards:
        loader = build_eval_loader("::".join(dataset.shards), inputs, batch_size)
    else:
        loader = batches_from_samples(dataset.folder_samples(), inputs, batch_size)
    for batch in tqdm(loader, desc=f"eval {dataset.name}", disable=not progress, leave=False):
        for m in modalities:
            embedded[m].append(model.encode(m, batch.inputs[m].to(device)).float().cpu())
        if classify:
            labels.append(batch.inputs["label"])
        skipped += batch.skipped
    emb = {m: torch.cat(parts) for m, parts in embedded.items()}  # modality -> (N, D)
    targets = torch.cat(labels) if classify else None  # (N,)

    metrics: Dict[str, Any] = {}
    confusion: Dict[str, torch.Tensor] = {}
    if targets is not None:
        classifier = (
            class_embeddings(model, preprocess["text"], dataset.classnames, dataset.templates, device).float().cpu()
        )  # (C, D)
        for m in modalities:
            if m != "text":
                logits = emb[m] @ classifier.T  # (N, D) x (D, C) -> (N, C)
                for name, value in classification_metrics(logits, targets, len(dataset.classnames)).items():
                    metrics[_metric_name(m, name)] = value
                confusion[m] = confusion_matrix(logits, targets, len(dataset.classnames))
                if probe:
                    metrics[_metric_name(m, "linear_probe_acc1")] = linear_probe(emb[m], targets)["acc1"]
    match = targets if dataset.retrieval_match == "class" else None
    for query, gallery in combinations(modalities, 2):
        for q, g in ((query, gallery), (gallery, query)):
            for k, value in recall_at_k(emb[q], emb[g], recall_k, match).items():
                metrics[_retrieval_name(q, g, k)] = value
    metrics.update(
        dataset=dataset.name,
        samples=len(next(iter(emb.values()))),
        classes=len(dataset.classnames),
        skipped=skipped,
        retrieval_match=dataset.retrieval_match,
    )
    return DatasetResult(metrics, dataset.classnames, confusion)


def _metric_name(modality: str, name: str) -> str:
    return name if modality == "image" else f"{modality}_{name}"


def _retrieval_name(query: str, gallery: str, k: int) -> str:
    if {query, gallery} == {"image", "text"}:  # CLIP_benchmark's names: named after what is retrieved
        return f"{gallery}_retrieval_recall@{k}"
    return f"{query}_to_{gallery}_recall@{k}"
