"""Atomic, resumable checkpoints: <run>/checkpoints/step_XXXXXXXX/ and a `latest` file beside them.

A checkpoint directory holds the engine's state (engine.pt, or DeepSpeed's sharded files), one
rng_<rank>.pt per process, the full weights (model.safetensors), config.yaml and meta.json; with an EMA
of the weights, also each process's float32 average (ema_<rank>.safetensors, its ZeRO-3 partitions) and
the average's full weights (ema.safetensors). Every
process writes into a hidden temporary directory; process 0 renames it into place only when all have
finished, then replaces
`latest` atomically, so a crash mid-save never leaves a partial checkpoint as the latest one. A save
that is the run's best so far (run.keep_best) then replaces `best` the same way; pruning spares it.
Our own files load with `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file

from mmcl import dist
from mmcl.errors import CheckpointError

LATEST_FILE = "latest"
BEST_FILE = "best"  # names the checkpoint of the best value of run.keep_best's metric
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"  # the full model weights, for evaluation and conversion
EMA_WEIGHTS_FILE = "ema.safetensors"  # the full weights of the EMA (optim.ema_decay), the same way
DEEPSPEED_TAG = "deepspeed"  # the folder DeepSpeed's own (sharded) files go in, inside a checkpoint


class Checkpointable(Protocol):
    """What a checkpoint needs of the training engine (every method is collective)."""

    def save(self, directory: Path, client_state: Dict[str, Any]) -> None: ...

    def load(self, directory: Path) -> Dict[str, Any]: ...

    def model_state(self) -> Dict[str, torch.Tensor]: ...


class Averaged(Protocol):
    """What a checkpoint needs of an average of the weights (mmcl.train.ema.WeightAverage)."""

    def state(self) -> Dict[str, torch.Tensor]: ...

    def load_state(self, state: Dict[str, torch.Tensor], source: Path) -> None: ...

    def restart(self) -> None: ...

    def full_weights(self) -> Dict[str, torch.Tensor]: ...


log = logging.getLogger("mmcl.checkpoint")


def ema_state_file(rank: int) -> str:
    return f"ema_{rank}.safetensors"  # one process's float32 average, exactly as it holds it


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_states() -> Dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save(
    run_dir: Path,
    step: int,
    engine: Checkpointable,
    meta: Dict[str, Any],
    config_yaml: str,
    keep_last: int,
    best: bool = False,
    ema: Optional[Averaged] = None,
) -> Path:
    """Collective: every process calls it with the same step; returns the checkpoint directory. `best`:
    `best` names it too, once it is complete."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if dist.rank() == 0:
        for stale in root.glob(".tmp_step_*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save(tmp, {"step": step})
        torch.save(_rng_states(), tmp / f"rng_{dist.rank()}.pt")
        weights = engine.model_state()  # collective under ZeRO-3 (gathers the shards)
        ema_weights = ema.full_weights() if ema is not None else None  # collective too
        if ema is not None:
            save_file(ema.state(), tmp / ema_state_file(dist.rank()))
        dist.barrier()
        if dist.rank() == 0:
            save_file(weights, tmp / WEIGHTS_FILE)
            if ema_weights is not None:
                save_file(ema_weights, tmp / EMA_WEIGHTS_FILE)
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / META_FILE).write_text(json.dumps({"step": step, "world_size": dist.world_size(), **meta}) + "\n")
            _fsync_tree(tmp)
    except (OSError, RuntimeError) as error:  # a full disk, a quota, a lost mount (torch.save reports
        # a failed write as RuntimeError): remove the partial directory, keep what was there
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise CheckpointError(
            f"could not write the checkpoint of step {step} ({reason}); "
            f"the latest checkpoint is still {latest(run_dir) or 'none'}"
        ) from error
    if dist.rank() == 0:
        _publish(root, tmp, final)
        if best:
            _point(root, BEST_FILE, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished checkpoint into place, then point `latest` at it (each step atomic)."""
    if final.exists():
        if latest(root.parent) == final:
            # The same step again (a stop signal right after a periodic save): the state is the same,
            # and replacing the directory `latest` names would open a window with no checkpoint.
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)  # left by a crash between its rename and the `latest` update
    os.rename(tmp, final)
    _point(root, LATEST_FILE, final)


def _point(root: Path, pointer: str, checkpoint: Path) -> None:
    """Replace the pointer file (`latest`, `best`) atomically: it names `checkpoint` or what it named."""
    tmp = root / f".{pointer}.tmp"
    tmp.write_text(checkpoint.name + "\n")
    os.replace(tmp, root / pointer)
    _fsync_dir(root)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the last `keep_last` checkpoints, and the one `best` names."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    kept = best(root.parent)
    for old in steps[:-keep_last]:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)


def _pointed(run_dir: Path, pointer: str) -> Optional[Path]:
    file = checkpoint_root(run_dir) / pointer
    if not file.exists():
        return None
    path = checkpoint_root(run_dir) / file.read_text().strip()
    return path if (path / META_FILE).exists() else None


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    return _pointed(run_dir, LATEST_FILE)


def best(run_dir: Path) -> Optional[Path]:
    """The checkpoint of the best value of run.keep_best's metric so far, or None."""
    return _pointed(run_dir, BEST_FILE)


def point_best(run_dir: Path, checkpoint: Path) -> None:
    """Process 0: `best` names this complete checkpoint from now on."""
    _point(checkpoint_root(run_dir), BEST_FILE, checkpoint)


def update_meta(checkpoint: Path, fields: Dict[str, Any]) -> None:
    """Process 0: set fields of a complete checkpoint's meta data, atomically (the file is replaced)."""
    meta = {**read_meta(checkpoint), **fields}
    tmp = Path(checkpoint) / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta) + "\n")
    os.replace(tmp, Path(checkpoint) / META_FILE)
    _fsync_dir(Path(checkpoint))


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint directory belongs to (<run>/checkpoints/step_N)."""
    return Path(checkpoint).parent.parent


def from_pointer(path: Path) -> Optional[Path]:
    """A run directory's checkpoint named by a pointer written as a path: <run>/best or <run>/latest
    (shorthands, no such file exists), or the pointer file itself, <run>/checkpoints/best; else None."""
    path = Path(path)
    if path.name not in (LATEST_FILE, BEST_FILE) or path.is_dir():
        return None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not checkpoint_root(run_dir).is_dir():
        return None
    found = _pointed(run_dir, path.name)
    if found is None:
        raise CheckpointError(f"{path}: {run_dir} has no complete {path.name} checkpoint")
    return found


def resolve(run_dir: Path, resume: str) -> Optional[Path]:
    """`resume` from the config: "" -> None, "latest" -> newest complete checkpoint (or None), else a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest(run_dir)
    path = Path(resume)
    if not (path / META_FILE).exists():
        raise CheckpointError(f"run.resume={resume!r}: not a complete checkpoint (no {META_FILE})")
    return path


def read_meta(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def load(path: Path, engine: Checkpointable, ema: Optional[Averaged] = None) -> Dict[str, Any]:
    """Collective: restores the engine, this process's RNG and the EMA (a checkpoint without one starts
    it from the restored weights); returns the checkpoint's meta data."""
    meta = read_meta(path)
    if meta["world_size"] != dist.world_size():
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} processes, this run has "
            f"{dist.world_size()}: resume with the same number of processes"
        )
    engine.load(path)
    _restore_rng(torch.load(Path(path) / f"rng_{dist.rank()}.pt", weights_only=True))
    if ema is not None:
        _restore_ema(Path(path), ema)
    return meta


def _restore_ema(path: Path, ema: Averaged) -> None:
    file = path / ema_state_file(dist.rank())
    if file.exists():
        ema.load_state(load_file(file, device=str(next(iter(ema.state().values())).device)), file)
        return
    ema.restart()  # the engine's weights are the checkpoint's now
    if dist.rank() == 0:
        log.warning("%s holds no EMA of the weights: the average starts from its weights", path)


def load_weights(path: Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """A checkpoint's full weights: the trained weights, or with `ema` the average's (ema.safetensors)."""
    file = Path(path) / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE)
    if ema and not file.exists():
        raise CheckpointError(f"{path} holds no {EMA_WEIGHTS_FILE}: its run kept no EMA (optim.ema_decay=0)")
    return load_file(file)
