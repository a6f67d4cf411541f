"""Zero-shot evaluation of a model on one dataset (layouts: datasets.py): classification of every
non-text modality by prompt ensembles, a linear probe on the frozen embeddings, and recall@k in both
directions for every pair of modalities (a sample's several captions all count as its matches); or, on
a caption-choice set, the share of true captions chosen over the wrong ones (caption_choice.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from mmcl import dist
from mmcl.config import ProbeConfig, parse_fields
from mmcl.data import InputSpec
from mmcl.data.decode import shard_field
from mmcl.errors import ConfigError, DataError
from mmcl.eval.caption_choice import WRONG_CAPTIONS, caption_choice_accuracy
from mmcl.eval.datasets import NEGATIVES_FIELD, EvalSet, load_dataset
from mmcl.eval.embed import Embedded, embed_split
from mmcl.eval.linear_probe import fewshot_probe, linear_probe
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


def captions_of(tokenize: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """A sample's captions as the "captions" kind decodes them (a text field's lines, CLIP_benchmark's
    retrieval layout, or a JSON list under a key, json:captions), tokenized: (K, L)."""

    def tokenize_each(captions: Any) -> torch.Tensor:
        return torch.stack([tokenize(caption) for caption in captions])  # K x (L,) -> (K, L)

    return tokenize_each


@dataclass
class DatasetResult:
    metrics: Dict[str, Any]
    classnames: List[str]
    confusion: Dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (C, C) counts


def check_probe_config(cfg: ProbeConfig, key: str = "eval.linear_probe") -> None:
    if cfg.shots == 0:
        raise ConfigError(f"config key '{key}.shots': 0 samples per class leaves nothing to fit (-1: all)")


def eval_inputs(
    model: MultiEncoder, dataset: EvalSet, fields: Mapping[str, str], labelled: bool
) -> Dict[str, InputSpec]:
    """What to read of the dataset: each modality the model embeds and the samples hold (captions as
    several rows per sample), and the class label."""
    preprocess = model.preprocessors(train=False)
    inputs = {"label": InputSpec("label", ["cls"], torch.tensor)} if labelled else {}
    for modality in model.modalities:
        present = [f for f in parse_fields(fields.get(modality, "")) if shard_field(f) in dataset.fields]
        kind = model.tower(modality).input_kind
        if present and kind == "text":
            inputs[modality] = InputSpec("captions", present, captions_of(preprocess[modality]), ragged=True)
        elif present:
            inputs[modality] = InputSpec(kind, present, preprocess[modality])
    if dataset.task == "caption_choice" and "text" in inputs:
        inputs[WRONG_CAPTIONS] = InputSpec("captions", [NEGATIVES_FIELD], captions_of(preprocess["text"]), ragged=True)
    return inputs


@torch.no_grad()
def evaluate_dataset(
    model: MultiEncoder,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    recall_k: Sequence[int],
    fields: Mapping[str, str],
    progress: bool = True,
    probe: Optional[ProbeConfig] = None,
) -> Optional[DatasetResult]:
    """Zero-shot classification of every non-text modality the shards hold (and the model embeds),
    a linear probe of each, and retrieval recall@k in both directions for every pair of those
    modalities and captions.

    Collective when distributed: every process embeds its share of the shards; process 0 computes the
    metrics (no collective in that part) and returns them, the others return None.

    `fields`: modality -> ";"-separated shard fields (the training config's data.fields).
    Image metrics keep CLIP_benchmark's names (acc1, text_retrieval_recall@k = image -> caption, ...);
    other modalities' are prefixed ("audio_acc1", "audio_to_image_recall@k").
    """
    probe = probe if probe is not None else ProbeConfig()
    dataset = load_dataset(root)
    classify = bool(dataset.classnames)  # a retrieval set or a plain mmcl shard set has no classes
    inputs = eval_inputs(model, dataset, fields, classify)
    modalities = [m for m in inputs if m not in ("label", WRONG_CAPTIONS)]
    if not [m for m in modalities if m != "text"] or (not classify and len(modalities) < 2):
        raise DataError(
            f"{root}: nothing to evaluate: its samples hold {sorted(dataset.fields)}, the model's "
            f"towers read {dict(fields)}{'' if classify else ', and it has no classes'}"
        )
    if dataset.task == "caption_choice" and "text" not in inputs:
        raise DataError(f"{root}: a caption-choice set needs a text tower reading its .txt captions ({dict(fields)})")
    split = embed_split(
        model,
        dataset.shards,
        dataset.folder_samples,
        inputs,
        batch_size,
        device,
        f"eval {dataset.name}",
        progress,
        {WRONG_CAPTIONS: "text"},
    )
    if len(split) == 0:  # every process holds the merged split, so all stop here alike
        raise DataError(
            f"{root}: none of its samples could be read ({split.skipped} skipped; the warnings above say why "
            "for each): the towers "
            f"read { ({m: list(spec.fields) for m, spec in inputs.items()}) }; are those the fields its samples hold?"
        )
    probe_split = _embed_probe_split(model, dataset, inputs, probe, batch_size, device, progress) if classify else None
    # Process 0 computes the metrics while the others wait in the vote below, so an error there (a class
    # with too few samples for the probe, ...) stops every process instead of leaving them in a collective.
    result, error = None, None
    if dist.rank() == 0:
        try:
            result = _metrics(model, dataset, split, probe_split, probe, recall_k, device)
        except Exception as raised:  # re-raised below, unchanged
            error = raised
    if dist.any_rank(error is not None):
        if error is not None:
            raise error
        raise DataError(f"{root}: the evaluation failed on process 0 (its output says why)")
    return result


def _metrics(
    model: MultiEncoder,
    dataset: EvalSet,
    split: Embedded,
    probe_split: Optional[Embedded],
    probe: ProbeConfig,
    recall_k: Sequence[int],
    device: torch.device,
) -> DatasetResult:
    metrics: Dict[str, Any] = {}
    confusion: Dict[str, torch.Tensor] = {}
    if dataset.classnames:
        tokenize = model.preprocessors(train=False)["text"]
        classifier = class_embeddings(model, tokenize, dataset.classnames, dataset.templates, device).float().cpu()
        confusion = _classify(split, classifier, len(dataset.classnames), metrics)
        _probe(split, probe_split, probe, metrics)
    if dataset.task == "caption_choice":
        _caption_choice(split, metrics)
    else:
        _retrieval(split, recall_k, dataset.retrieval_match == "class", metrics)
    metrics.update(
        dataset=dataset.name,
        samples=len(split),
        classes=len(dataset.classnames),
        skipped=split.skipped,
        retrieval_match=dataset.retrieval_match,
    )
    return DatasetResult(metrics, dataset.classnames, confusion)


def _embed_probe_split(
    model: MultiEncoder,
    dataset: EvalSet,
    inputs: Mapping[str, InputSpec],
    probe: ProbeConfig,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> Optional[Embedded]:
    """The labelled split the few-shot probe learns from, embedded (its non-text modalities), or None
    when the probe is not few-shot."""
    if probe.mode in ("none", "halves"):
        return None
    shards = dataset.labelled_split(probe.split)
    if not shards:
        if probe.mode == "fewshot":
            raise DataError(
                f"{dataset.root / probe.split}: no labelled shards (with .cls) for the few-shot linear probe "
                "(eval.linear_probe.split)"
            )
        return None
    wanted = {m: spec for m, spec in inputs.items() if m != "text"}
    desc = f"eval {dataset.name}/{probe.split}"
    return embed_split(model, shards, lambda: iter(()), wanted, batch_size, device, desc, progress)


def _classify(split: Embedded, classifier: torch.Tensor, classes: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Zero-shot classification of each non-text modality into `metrics`; its confusion matrices."""
    assert split.labels is not None
    confusion = {}
    for m in split.emb:
        if m != "text":
            logits = split.emb[m] @ classifier.T  # (N, D) x (D, C) -> (N, C)
            for name, value in classification_metrics(logits, split.labels, classes).items():
                metrics[_metric_name(m, name)] = value
            confusion[m] = confusion_matrix(logits, split.labels, classes)
    return confusion


def _probe(split: Embedded, probe_split: Optional[Embedded], cfg: ProbeConfig, metrics: Dict[str, Any]) -> None:
    """The linear probe of each non-text modality into `metrics`: few-shot from the labelled split, or
    fitted on one half of the test split and scored on the other."""
    assert split.labels is not None
    if cfg.mode == "none":
        return
    for m in split.emb:
        if m == "text":
            continue
        if probe_split is not None:
            assert probe_split.labels is not None
            result = fewshot_probe(
                probe_split.emb[m],
                probe_split.labels,
                split.emb[m],
                split.labels,
                cfg.shots,
                cfg.val_fraction,
                cfg.seed,
            )
            for name in ("acc1", "acc5", "mean_per_class_recall"):
                metrics[_metric_name(m, f"linear_probe_{name}")] = result[name]
            metrics[_metric_name(m, "linear_probe")] = f"fewshot k={cfg.shots} C={result['regularisation']:.3g}"
        else:
            metrics[_metric_name(m, "linear_probe_acc1")] = linear_probe(split.emb[m], split.labels, cfg.seed)["acc1"]
            metrics[_metric_name(m, "linear_probe")] = "halves"


def _retrieval(split: Embedded, recall_k: Sequence[int], by_class: bool, metrics: Dict[str, Any]) -> None:
    """recall@k in both directions for every pair of modalities into `metrics`. A query's matches are
    the rows of its own sample (all of its captions), or with `by_class` every row of its class."""
    for query, gallery in combinations(list(split.emb), 2):
        for q, g in ((query, gallery), (gallery, query)):
            q_owner, g_owner = split.owner(q), split.owner(g)  # (Nq,), (Ng,) sample of each row
            if by_class:
                assert split.labels is not None
                q_owner, g_owner = split.labels[q_owner], split.labels[g_owner]
            matches = q_owner[:, None] == g_owner[None, :]  # (Nq, Ng)
            for k, value in recall_at_k(split.emb[q], split.emb[g], recall_k, matches).items():
                metrics[_retrieval_name(q, g, k)] = value


def _caption_choice(split: Embedded, metrics: Dict[str, Any]) -> None:
    """Each non-text modality's choice of its true captions over the wrong ones into `metrics`. (No
    retrieval: a caption-choice set may hold one image in several samples, one per true caption.)"""
    for m in split.emb:
        if m not in ("text", WRONG_CAPTIONS):
            accuracy = caption_choice_accuracy(
                split.emb[m],
                split.emb["text"],
                split.counts["text"],
                split.emb[WRONG_CAPTIONS],
                split.counts[WRONG_CAPTIONS],
            )
            metrics[_metric_name(m, "caption_choice_acc")] = accuracy
    metrics["caption_choice_trials"] = int(split.counts["text"].sum())


def _metric_name(modality: str, name: str) -> str:
    return name if modality == "image" else f"{modality}_{name}"


def _retrieval_name(query: str, gallery: str, k: int) -> str:
    if {query, gallery} == {"image", "text"}:  # CLIP_benchmark's names: named after what is retrieved
        return f"{gallery}_retrieval_recall@{k}"
    return f"{query}_to_{gallery}_recall@{k}"
