"""The training loop: wire config -> model, loss, engine, stream; run; log; checkpoint; evaluate.

Runs unchanged as one process or under a launcher (torchrun, deepspeed, srun): every process trains on
its share of the shards; process 0 alone writes metrics, shows progress and evaluates.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from mmcl import config as config_lib
from mmcl import dist
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.convert import load_initial_weights
from mmcl.config import Config
from mmcl.data import InputSpec, TrainStream
from mmcl.eval.datasets import check_dataset
from mmcl.eval.suite import evaluate_all
from mmcl.losses import build_loss
from mmcl.models import MultiEncoder
from mmcl.train.engine import build_engine
from mmcl.train.gradcache import build_backward, micro_steps
from mmcl.train.metrics_log import MetricsLog, truncate_log
from mmcl.train.step import train_step

log = logging.getLogger("mmcl.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is available")
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def stream_inputs(model: MultiEncoder, cfg: Config) -> Dict[str, InputSpec]:
    """What the stream must produce: one input per tower, read from the configured shard fields, with a
    placeholder for each modality a sample may lack."""
    preprocess = model.preprocessors(train=True)
    return {m: InputSpec(model.tower(m).input_kind, cfg.data.fields[m].split(";"), preprocess[m],
                         model.tower(m).placeholder() if m in cfg.data.optional_modalities else None)
            for m in model.modalities}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class TrainingHalted(RuntimeError):
    """The run cannot go on usefully (too much bad data, or no finite gradients); the last periodic
    checkpoint stays the latest."""


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (a scheduler's warning before preemption or the time limit)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("received %s: checkpointing after this step, then stopping", signal.Signals(signum).name)
        self.requested = True


@dataclass
class RunResult:
    run_dir: Path  # config.yaml, metrics.jsonl, tensorboard/, loss.png, checkpoints/, eval.json
    step: int
    stopped: bool  # stopped early on SIGTERM/SIGUSR1, after checkpointing: resume with run.resume=latest


def open_run_dir(cfg: Config) -> tuple:
    """(run directory, checkpoint to resume from or None, the config as YAML), after the checks that
    must pass before any compute: no silent overwrite of a run, evaluation sets present."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_from = checkpoints.resolve(run_dir, cfg.run.resume)
    if resume_from is None and checkpoints.latest(run_dir) is not None:
        raise FileExistsError(f"run directory {run_dir} already holds checkpoints: pass run.resume=latest "
                              "to continue it, or choose another run.name")
    for root in cfg.eval.datasets:  # a missing evaluation set should stop the run now, not after training
        check_dataset(root)
    config_yaml = config_lib.to_yaml(cfg)
    if dist.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    dist.barrier()  # the run directory exists for every process
    return run_dir, resume_from, config_yaml


def train(cfg: Config) -> RunResult:
    """Train as configured, until run.steps or a stop signal."""
    dist.init_from_env()
    is_main = dist.rank() == 0
    run_dir, resume_from, config_yaml = open_run_dir(cfg)
    seed_everything(cfg.run.seed)  # identical initial weights on every process
    device = pick_device(cfg.engine.device)

    model = MultiEncoder(cfg.model)
    if cfg.model.init_from and resume_from is None:
        fresh = load_initial_weights(model, cfg.model.init_from)
        log.info("initialised from %s%s", cfg.model.init_from,
                 f"; {len(fresh)} parameters start fresh, e.g. {fresh[:3]}" if fresh else "")
    model = model.to(device)
    loss_fn = build_loss(cfg.loss)
    backward = build_backward(cfg.engine.grad_cache)
    engine = build_engine(model, cfg, micro_steps(backward, model.modalities, cfg.data.batch_size), device)
    step, samples_seen, samples_skipped, position = 0, 0, 0, (0, 0)
    if resume_from is not None:
        meta = checkpoints.load(resume_from, engine)
        step, samples_seen, samples_skipped = meta["step"], meta["samples_seen"], meta["samples_skipped"]
        position = tuple(meta["data_position"][dist.rank()])
        log.info("resumed from %s at step %d", resume_from, step)
    stream = TrainStream(cfg.data.train, stream_inputs(engine.model, cfg), cfg.data.batch_size,
                         cfg.data.workers, cfg.data.shuffle_buffer, cfg.run.seed, start=position)

    def save() -> Path:
        meta = {"samples_seen": samples_seen, "samples_skipped": samples_skipped,
                "data_position": dist.all_gather_object(stream.position)}  # one (epoch, batches) per process
        return checkpoints.save(run_dir, step, engine, meta, config_yaml, cfg.run.keep_last)

    samples_path = run_dir / f"samples_rank{dist.rank()}.jsonl"
    if cfg.run.log_samples:
        truncate_log(samples_path, step)
    stop = StopRequest()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.engine.precision == "bf16")
    engine.model.train()
    progress = tqdm(total=cfg.run.steps, initial=step, desc="train", dynamic_ncols=True,
                    disable=not (cfg.run.progress and is_main))
    started, seen_at_start = time.perf_counter(), samples_seen
    metrics_log = MetricsLog(run_dir, step) if is_main else None
    samples_file = open(samples_path, "a") if cfg.run.log_samples else None
    stopping, nonfinite_in_a_row, nonfinite_steps = False, 0, 0
    try:
        for batch in stream if step < cfg.run.steps else ():
            inputs = {m: x.to(device, non_blocking=True) for m, x in batch.inputs.items()}
            present = {m: batch.present[m].to(device) for m in cfg.data.optional_modalities}
            metrics = train_step(engine, partial(loss_fn, present=present), backward, inputs, autocast)
            step += 1
            samples_seen += len(batch) * dist.world_size()
            samples_skipped += batch.skipped
            bad = metrics.get("nonfinite", 0.0) > 0 or not math.isfinite(metrics["loss"])
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if bad else 0
            nonfinite_steps += bad
            metrics["nonfinite_steps"] = nonfinite_steps
            check_health(cfg, nonfinite_in_a_row, samples_skipped, samples_seen // dist.world_size())
            progress.update(1)
            if samples_file:
                samples_file.write(json.dumps({"step": step, "keys": batch.keys}) + "\n")
                samples_file.flush()
            if metrics_log and (step % cfg.run.log_every == 0 or step == cfg.run.steps):
                rate = (samples_seen - seen_at_start) / max(time.perf_counter() - started, 1e-9)
                metrics_log.write({"step": step, "samples_seen": samples_seen, "samples_skipped": samples_skipped,
                                   "epoch": stream.epoch, "samples_per_s": rate,
                                   "samples_per_s_per_device": rate / dist.world_size(), **metrics})
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                                     samples_s=f"{rate:.0f}", skipped=samples_skipped)
            stopping = dist.any_rank(stop.requested)
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or stopping:
                save()
            if step >= cfg.run.steps or stopping:
                break
            if cfg.eval.datasets and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                results = evaluate(cfg, engine, device, run_dir / "eval_steps" / f"step_{step:08d}.json", quiet=True)
                if metrics_log and results:
                    metrics_log.write_eval(step, results)
    finally:
        progress.close()
        if metrics_log:
            metrics_log.close()
        if samples_file:
            samples_file.close()

    if stopping:
        log.warning("stopped at step %d on request; resume with run.resume=latest", step)
    elif cfg.eval.datasets:
        evaluate(cfg, engine, device, run_dir / "eval.json")
    dist.barrier()
    return RunResult(run_dir, step, stopping)


def check_health(cfg: Config, nonfinite_in_a_row: int, skipped: int, seen: int) -> None:
    """Stop with a clear message when the run has stopped making sense (this process's counts)."""
    if nonfinite_in_a_row >= cfg.optim.max_nonfinite_steps:
        raise TrainingHalted(f"{nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient "
                             f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); lower optim.lr, "
                             "set optim.grad_clip, or check the data")
    if skipped > cfg.data.max_skipped_fraction * (skipped + seen) and skipped + seen >= 100:
        raise TrainingHalted(f"{skipped} of the {skipped + seen} samples read were unreadable, more than "
                             f"data.max_skipped_fraction={cfg.data.max_skipped_fraction}; see the warnings "
                             "naming each shard and key")


def evaluation_model(cfg: Config, weights: Dict[str, torch.Tensor], device: torch.device) -> MultiEncoder:
    """A plain, unsharded copy of the model for evaluation on one process."""
    model = MultiEncoder(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval()


def evaluate(cfg: Config, engine, device: torch.device, out_path: Path, quiet: bool = False) -> Optional[Dict]:
    """Evaluate the engine's current weights on cfg.eval.datasets (process 0; collective call)."""
    weights = engine.model_state()  # collective: gathers ZeRO-3 shards
    results = None
    if dist.rank() == 0:
        with torch.random.fork_rng(devices=[]):  # building and running the copy draws nothing from the run's RNG
            model = evaluation_model(cfg, weights, device)
            results = evaluate_all(model, cfg.eval.datasets, cfg.data.fields, cfg.eval.batch_size, cfg.eval.recall_k,
                                   out_path, device, model_name=cfg.run.name, progress=cfg.run.progress, quiet=quiet)
    dist.barrier()
    return results
