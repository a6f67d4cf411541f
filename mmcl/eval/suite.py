"""Evaluate one model on several datasets and write every report: the combined JSON, one
CLIP_benchmark-style JSON per dataset, a markdown table and a confusion matrix per classified modality.

Collective when distributed: every process embeds its share; process 0 alone computes and writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from mmcl import dist
from mmcl.config import ProbeConfig
from mmcl.eval.report import clip_benchmark_record, format_table, markdown_table, plot_confusion, write_json
from mmcl.eval.zeroshot import evaluate_dataset
from mmcl.models import MultiEncoder


@torch.no_grad()
def evaluate_all(
    model: MultiEncoder,
    datasets: Sequence[str],
    fields: Mapping[str, str],
    batch_size: int,
    recall_k: Sequence[int],
    out_path: Path,
    device: torch.device,
    model_name: str = "mmcl",
    progress: bool = True,
    quiet: bool = False,
    probe: Optional[ProbeConfig] = None,
) -> Optional[Dict[str, Dict[str, Any]]]:
    """Results by dataset name (on process 0; None on the others); writes out_path (e.g. eval.json), its
    .md twin, and beside them a folder (eval/) with <dataset>.json in CLIP_benchmark's shape and
    <dataset>-<modality>-confusion.png."""
    out_path = Path(out_path)
    reports = out_path.with_suffix("")  # eval.json -> eval/
    results: Dict[str, Dict[str, Any]] = {}
    for root in datasets:
        result = evaluate_dataset(model, root, batch_size, device, recall_k, fields, progress, probe)
        if result is None:  # not process 0: its share is embedded, the metrics are process 0's
            continue
        name = str(result.metrics["dataset"])
        results[name] = result.metrics
        write_json(clip_benchmark_record(result.metrics, model_name), reports / f"{name}.json")
        for modality, matrix in result.confusion.items():
            plot_confusion(
                matrix.numpy(),
                result.classnames,
                f"{name}: {modality} zero-shot",
                reports / f"{name}-{modality}-confusion.png",
            )
    if dist.rank() != 0:
        return None
    write_json(results, out_path)
    out_path.with_suffix(".md").write_text(markdown_table(results))
    if not quiet:
        print(format_table(results))
        print(f"results written to {out_path} (markdown: {out_path.with_suffix('.md')}, per dataset: {reports}/)")
    return results
