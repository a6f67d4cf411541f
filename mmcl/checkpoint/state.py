"""Atomic, resumable checkpoints: <run>/checkpoints/step_XXXXXXXX/{state.pt,config.yaml} and a `latest` file.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete,
and `latest` is replaced atomically afterwards, so a crash mid-save never leaves a partial checkpoint
as the latest one. States are loaded with `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

STATE_FILE = "state.pt"
LATEST_FILE = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, state: Dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / f".{LATEST_FILE}.{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Optional[Path]:
    pointer = checkpoint_root(run_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def resolve(run_dir: Path, resume: str) -> Optional[Path]:
    """`resume` from the config: "" -> None, "latest" -> newest complete checkpoint (or None), else a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"run.resume={resume!r}: no {STATE_FILE} there")
    return path


def load(path: Path) -> Dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
