"""Zero-shot evaluation of a trained model on one dataset in the CLIP_benchmark layout:

<root>/classnames.txt                               one class name per line, in label order
<root>/zeroshot_classification_templates.txt       prompt templates with "{c}"
<root>/test/*.tar                                   shards with an image, ".cls" label, optional ".txt"
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence

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


@torch.no_grad()
def evaluate_dataset(model: MultiEncoder, root: str | Path, batch_size: int, device: torch.device,
                     recall_k: Sequence[int], image_fields: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                     progress: bool = True) -> Dict[str, object]:
    root = Path(root)
    classnames = read_lines(root / "classnames.txt")
    templates = read_lines(root / TEMPLATES_FILE)
    shards = sorted(str(p) for p in (root / "test").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards under {root / 'test'}")
    preprocess = model.preprocessors(train=False)
    inputs = {"image": InputSpec("image", image_fields, preprocess["image"]),
              "label": InputSpec("label", ["cls"], torch.tensor)}
    with_captions = "txt" in _sample_fields(shards[0])
    if with_captions:
        inputs["text"] = InputSpec("text", ["txt"], preprocess["text"])

    model.eval()
    image_emb, text_emb, labels, skipped = [], [], [], 0
    loader = build_eval_loader("::".join(shards), inputs, batch_size)
    for batch in tqdm(loader, desc=f"eval {root.name}", disable=not progress, leave=False):
        image_emb.append(model.encode("image", batch.inputs["image"].to(device)).float().cpu())
        if with_captions:
            text_emb.append(model.encode("text", batch.inputs["text"].to(device)).float().cpu())
        labels.append(batch.inputs["label"])
        skipped += batch.skipped
    images = torch.cat(image_emb)  # (N, D)
    targets = torch.cat(labels)  # (N,)

    classifier = class_embeddings(model, preprocess["text"], classnames, templates, device).float().cpu()  # (C, D)
    logits = images @ classifier.T  # (N, D) x (D, C) -> (N, C)
    metrics: Dict[str, object] = classification_metrics(logits, targets, len(classnames))
    if with_captions:
        texts = torch.cat(text_emb)  # (N, D)
        for k, value in recall_at_k(images, texts, recall_k).items():
            metrics[f"text_retrieval_recall@{k}"] = value  # image query -> its caption
        for k, value in recall_at_k(texts, images, recall_k).items():
            metrics[f"image_retrieval_recall@{k}"] = value  # caption query -> its image
    metrics.update(dataset=root.name, samples=len(targets), classes=len(classnames), skipped=skipped)
    return metrics
