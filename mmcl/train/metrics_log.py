"""Where training metrics go (process 0 only): metrics.jsonl, TensorBoard, and a loss-curve plot at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def read_records(path: Path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the JSONL records of steps up to `last_step` (none for a fresh run): after a resume, the
    records past the checkpoint belong to the interrupted future."""
    if not path.exists():
        return
    kept = [record for record in read_records(path) if record["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


class MetricsLog:
    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        truncate_log(self.path, resumed_step)
        self.file = open(self.path, "a")
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: Dict[str, float]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, record["step"])

    def write_eval(self, step: int, results: Dict[str, Dict[str, object]]) -> None:
        """Mid-training evaluation: eval_history.jsonl, and TensorBoard scalars eval/<dataset>/<metric>."""
        with open(self.run_dir / "eval_history.jsonl", "a") as history:
            history.write(json.dumps({"step": step, "results": results}) + "\n")
        for dataset, metrics in results.items():
            for name, value in metrics.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(f"eval/{dataset}/{name}", value, step)

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()
        plot_curves(self.path, self.run_dir / "loss.png")


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Loss (and each loss part), learning rate and logit scale against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    parts = [k for k in records[-1] if k == "loss" or "-" in k]  # "loss" and pair parts like "image-text"
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in parts:
        axes[0].plot(steps, [r.get(name) for r in records], label=name)
    axes[0].set_title("loss")
    axes[0].legend(fontsize=8)
    for axis, name in zip(axes[1:], ("lr", "logit_scale")):
        axis.plot(steps, [r.get(name) for r in records])
        axis.set_title(name)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
