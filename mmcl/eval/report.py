"""Evaluation results as JSON and as a short readable table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def write_json(results: Dict[str, Dict[str, object]], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def format_table(results: Dict[str, Dict[str, object]]) -> str:
    """One row per dataset: sample count and every float metric, as percentages."""
    metric_names: List[str] = []
    for metrics in results.values():
        for name, value in metrics.items():
            if isinstance(value, float) and name not in metric_names:
                metric_names.append(name)
    header = ["dataset", "samples", *metric_names]
    rows = [[name, str(m.get("samples", "")), *(f"{100 * m[k]:.1f}" if k in m else "-" for k in metric_names)]
            for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
