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
    """One row per metric (there are many with several modalities), one column per dataset, in %."""
    metric_names: List[str] = []
    for metrics in results.values():
        for name, value in metrics.items():
            if isinstance(value, float) and name not in metric_names:
                metric_names.append(name)
    header = ["metric", *results]
    rows = [["samples", *(str(m.get("samples", "")) for m in results.values())]]
    rows += [[name, *(f"{100 * m[name]:.1f}" if name in m else "-" for m in results.values())]
             for name in metric_names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
