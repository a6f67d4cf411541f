"""Evaluation results: combined JSON, one CLIP_benchmark-style JSON per dataset, a printed table, a
markdown table, confusion-matrix images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from mmcl.plotting import pyplot


def write_json(results: Dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _table(results: Dict[str, Dict[str, Any]]) -> List[List[str]]:
    """Header and rows: one row per metric (there are many with several modalities), one column per
    dataset, in %."""
    metric_names: List[str] = []
    for metrics in results.values():
        for name, value in metrics.items():
            if isinstance(value, float) and name not in metric_names:
                metric_names.append(name)
    header = ["metric", *results]
    rows = [["samples", *(str(m.get("samples", "")) for m in results.values())]]
    rows += [[name, *(f"{100 * m[name]:.1f}" if name in m else "-" for m in results.values())] for name in metric_names]
    return [header, *rows]


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    """The table as aligned plain text, for the terminal."""
    table = _table(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: Dict[str, Dict[str, Any]]) -> str:
    """The same table in markdown."""
    header, *rows = _table(results)
    lines = ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]
    return "\n".join(lines) + "\n"


def clip_benchmark_record(metrics: Dict[str, Any], model: str) -> Dict[str, Any]:
    """One dataset's result in CLIP_benchmark's JSON shape (dataset, model, task, metrics, language)."""
    scores = {k: v for k, v in metrics.items() if isinstance(v, float)}
    retrieval_only = not any(k.endswith("acc1") for k in scores)
    return {
        "dataset": metrics.get("dataset"),
        "model": model,
        "pretrained": model,
        "task": "zeroshot_retrieval" if retrieval_only else "zeroshot_classification",
        "metrics": scores,
        "language": "en",
        "samples": metrics.get("samples"),
        "skipped": metrics.get("skipped"),
    }


def plot_confusion(matrix, classnames: List[str], title: str, path: Path) -> None:
    """A confusion-matrix heat map (rows: true class, columns: predicted) as PNG."""
    plt = pyplot()

    size = max(4.0, 0.45 * len(classnames) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classnames))
    ax.set_xticks(ticks, classnames, rotation=90)
    ax.set_yticks(ticks, classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classnames) <= 30:
        peak = float(matrix.max()) or 1.0
        for i in ticks:
            for j in ticks:
                value = int(matrix[i][j])
                if value:
                    ax.text(
                        j,
                        i,
                        str(value),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > peak / 2 else "black",
                    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
