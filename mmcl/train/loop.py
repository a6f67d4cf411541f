"""The single-process training loop: wire config -> model, loss, stream, optimiser; run; checkpoint; evaluate."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Dict

import torch
from tqdm import tqdm

from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.config import Config
from mmcl.data import InputSpec, TrainStream
from mmcl.eval.report import format_table, write_json
from mmcl.eval.zeroshot import evaluate_dataset
from mmcl.losses import build_loss
from mmcl.models import MultiEncoder
from mmcl.train.gradcache import build_backward
from mmcl.train.optim import build_optimizer, build_schedule
from mmcl.train.step import train_step

log = logging.getLogger("mmcl.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device=cuda but no CUDA device is available")
    return torch.device(name)


def stream_inputs(model: MultiEncoder, fields: Dict[str, str]) -> Dict[str, InputSpec]:
    """What the stream must produce: one input per tower, read from the configured shard fields."""
    preprocess = model.preprocessors(train=True)
    return {m: InputSpec(model.tower(m).input_kind, fields[m].split(";"), preprocess[m]) for m in model.modalities}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config) -> Path:
    """Train as configured; returns the run directory (config.yaml, metrics.jsonl, checkpoints/, eval.json)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_from = checkpoints.resolve(run_dir, cfg.run.resume)
    if resume_from is None and checkpoints.latest(run_dir) is not None:
        raise FileExistsError(f"run directory {run_dir} already holds checkpoints: pass run.resume=latest "
                              "to continue it, or choose another run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = config_lib.to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_yaml)
    seed_everything(cfg.run.seed)
    device = pick_device(cfg.engine.device)

    model = MultiEncoder(cfg.model).to(device)
    loss_fn = build_loss(cfg.loss)
    backward = build_backward(cfg.engine.grad_cache)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, cfg.run.steps)
    stream = TrainStream(cfg.data.train, stream_inputs(model, cfg.data.fields), cfg.data.batch_size,
                         cfg.data.workers, cfg.data.shuffle_buffer, cfg.run.seed)
    step, samples_seen, samples_skipped = 0, 0, 0

    if resume_from is not None:
        state = checkpoints.load(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, samples_seen, samples_skipped = state["step"], state["samples_seen"], state["samples_skipped"]
        stream.epoch = state["data_epoch"] + 1  # the interrupted epoch is not replayed (exact resume: later)
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d", resume_from, step)

    def save() -> Path:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "samples_seen": samples_seen,
                 "samples_skipped": samples_skipped, "data_epoch": stream.epoch,
                 "torch_rng": torch.get_rng_state(), "config": config_yaml}
        return checkpoints.save(run_dir, step, state, config_yaml, cfg.run.keep_last)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.engine.precision == "bf16")
    model.train()
    progress = tqdm(total=cfg.run.steps, initial=step, desc="train", disable=not cfg.run.progress, dynamic_ncols=True)
    started = time.perf_counter()
    # A resumed run appends to its metrics; a fresh one starts them anew.
    with open(run_dir / "metrics.jsonl", "a" if resume_from is not None else "w") as metrics_file:
        for batch in stream if step < cfg.run.steps else ():
            inputs = {m: x.to(device, non_blocking=True) for m, x in batch.inputs.items()}
            metrics = train_step(model, loss_fn, backward, optimizer, scheduler, inputs, cfg.optim.grad_clip, autocast)
            step += 1
            samples_seen += len(batch)
            samples_skipped += batch.skipped
            if batch.skipped:
                log.warning("%d unreadable sample(s) skipped so far", samples_skipped)
            progress.update(1)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                elapsed = time.perf_counter() - started
                record = {"step": step, "samples_seen": samples_seen, "samples_skipped": samples_skipped,
                          "epoch": stream.epoch, "samples_per_s": samples_seen / max(elapsed, 1e-9), **metrics}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}")
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
                save()
            if step >= cfg.run.steps:
                break
    progress.close()

    if cfg.eval.datasets:
        evaluate(model, cfg, run_dir / "eval.json", device)
    return run_dir


def evaluate(model: MultiEncoder, cfg: Config, out_path: Path, device: torch.device) -> Dict[str, Dict]:
    results = {}
    for root in cfg.eval.datasets:
        metrics = evaluate_dataset(model, root, cfg.eval.batch_size, device, cfg.eval.recall_k,
                                   image_fields=cfg.data.fields["image"].split(";"), progress=cfg.run.progress)
        results[str(metrics["dataset"])] = metrics
    write_json(results, out_path)
    print(format_table(results))
    print(f"results written to {out_path}")
    return results
