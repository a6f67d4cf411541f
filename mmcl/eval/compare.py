"""Several models' evaluation results side by side: a long-format CSV, one markdown table per dataset
(the best model in bold) and a bar chart per dataset and metric.

Results are {model name: {dataset name: {metric: value, ...}}} as `evaluate_all` returns them per model:
float values are metrics in [0, 1] (all higher-is-better), anything else ("samples", "dataset", ...) is
information and stays out of the comparison.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from mmcl.plotting import pyplot

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]  # model -> dataset -> metric -> value
Row = Tuple[str, str, str, float]  # model, dataset, metric, value (a fraction)

UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")  # anything else may mean a folder, a drive or a shell glob


def file_name(text: str) -> str:
    """text as one safe file-name component: characters other than letters, digits and ._@+=- become "_"."""
    safe = UNSAFE.sub("_", text)
    return "_" + safe if safe.startswith(".") else safe  # never "." or "..", never a hidden file


def model_names(names: Sequence[str], paths: Sequence[Path]) -> List[str]:
    """Each model's own name, or where two models share one, that name and its path's stem
    ("tiny-run_a"); a number follows where even those collide."""
    counts = {name: names.count(name) for name in names}
    named = [
        name if counts[name] == 1 else f"{name}-{Path(path).stem}" for name, path in zip(names, paths, strict=True)
    ]
    out: List[str] = []
    for name in named:
        unique, n = name, 1
        while unique in out or (unique != name and unique in named):
            n += 1
            unique = f"{name}-{n}"
        out.append(unique)
    return out


def _ordered(results: Results) -> Tuple[List[str], Dict[str, List[str]]]:
    """Datasets in the order they first appear, and each dataset's float metrics likewise (models may
    differ: another modality, another recall_k)."""
    metrics: Dict[str, List[str]] = {}
    for by_dataset in results.values():
        for dataset, values in by_dataset.items():
            names = metrics.setdefault(dataset, [])
            names += [k for k, v in values.items() if isinstance(v, float) and k not in names]
    return list(metrics), metrics


def comparison_rows(results: Results) -> List[Row]:
    """(model, dataset, metric, value) for every float metric, models in the given order."""
    return [
        (model, dataset, metric, float(value))
        for model, by_dataset in results.items()
        for dataset, values in by_dataset.items()
        for metric, value in values.items()
        if isinstance(value, float)
    ]


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a "|" in a name would split the markdown cell


def comparison_markdown(results: Results) -> str:
    """One table per dataset: a row per metric, a column per model, in % with one decimal; the best value
    of each metric in bold (all of the models tied at the shown precision), "-" where a model lacks it."""
    models = list(results)
    datasets, metrics = _ordered(results)
    sections = []
    for dataset in datasets:
        samples = {results[m][dataset].get("samples") for m in models if dataset in results[m]} - {None}
        heading = f"### {dataset}" + (f" ({samples.pop()} samples)" if len(samples) == 1 else "")
        lines = [
            heading,
            "",
            "| metric (%) | " + " | ".join(_cell(m) for m in models) + " |",
            "| --- |" + " ---: |" * len(models),
        ]
        for metric in metrics[dataset]:
            shown = [
                _percent(v) if isinstance(v := results[m].get(dataset, {}).get(metric), float) else "-" for m in models
            ]
            # Compared as shown: two models both reading 99.7 are both bold, never one of them.
            best = max(float(s) for s in shown if s != "-")
            cells = [f"**{s}**" if s != "-" and float(s) == best else s for s in shown]
            lines.append(f"| {_cell(metric)} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: a reader never sees half a file, an interrupted run leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _write_csv(rows: List[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "dataset", "metric", "value"])
        writer.writerows(rows)  # floats as repr: they read back to the same value


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


def _bar_chart(values: Dict[str, float], title: str, path: Path) -> None:
    """One bar per model, its value in % above it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(values)), 4.0))
    bars = ax.bar(range(len(values)), [100 * v for v in values.values()], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", padding=2)
    long_names = max(len(name) for name in values) > 12
    ax.set_xticks(
        range(len(values)), list(values), rotation=30 if long_names else 0, ha="right" if long_names else "center"
    )
    ax.set_ylim(0, 108)  # room for the label of a bar at 100%
    ax.set_ylabel("%")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)  # the format named: the temporary file has no .png suffix
    plt.close(fig)


def write_comparison(results: Results, out_dir: Path) -> Dict[str, Path]:
    """Writes into out_dir comparison.csv (model,dataset,metric,value; values as fractions, full
    precision), comparison.md (`comparison_markdown`) and charts/<dataset>-<metric>.png (one bar per
    model), file names made safe by `file_name`. Returns the paths written by their names relative to
    out_dir ("comparison.csv", "comparison.md", "charts/digits-acc1.png", ...)."""
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}

    def write(relative: str, writer: Callable[[Path], None]) -> None:
        _write_atomically(out_dir / relative, writer)
        written[relative] = out_dir / relative

    rows = comparison_rows(results)
    markdown = comparison_markdown(results)
    write("comparison.csv", functools.partial(_write_csv, rows))
    write("comparison.md", functools.partial(_write_text, markdown))
    datasets, metrics = _ordered(results)
    for dataset in datasets:
        for metric in metrics[dataset]:
            values = {m: float(v) for m in results if isinstance(v := results[m].get(dataset, {}).get(metric), float)}
            chart = functools.partial(_bar_chart, values, f"{dataset}: {metric}")
            write(f"charts/{file_name(dataset)}-{file_name(metric)}.png", chart)
    return written
