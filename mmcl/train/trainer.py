"""The training run: check the config, build model, loss, engine and stream, then step -> log ->
checkpoint -> evaluate until run.steps or a stop signal.

Runs unchanged as one process or under a launcher (torchrun, deepspeed, srun): every process trains on
its share of the shards; process 0 alone writes metrics, shows progress and evaluates.
"""

from __future__ import annotations

import logging
import random
import signal
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from mmcl import config as config_lib
from mmcl import dist
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.init_from import load_initial_weights
from mmcl.config import Config, RunConfig, parse_fields
from mmcl.data import Batch, InputSpec, TrainStream, check_data_config
from mmcl.data.augment import view_inputs
from mmcl.data.captions import caption_inputs, caption_views
from mmcl.data.negatives import negative_inputs
from mmcl.data.sources import build_mixing, held_modalities, optional_modalities, training_sources
from mmcl.eval.datasets import check_dataset
from mmcl.eval.suite import evaluate_all
from mmcl.eval.zeroshot import check_probe_config
from mmcl.losses import build_loss, check_loss_config
from mmcl.losses.distill import with_distillation
from mmcl.models import TOWERS, MultiEncoder, check_model_config, load_model
from mmcl.models.tuning import frozen_whole
from mmcl.train.best import KeepBest, check_keep_best
from mmcl.train.compile import compile_towers
from mmcl.train.ema import build_average, ema_report_path, with_ema_results
from mmcl.train.engine import Engine, StepShape, build_engine, check_engine_config
from mmcl.train.gradcache import LossFn, build_backward, micro_steps
from mmcl.train.metrics_log import TrainingLog
from mmcl.train.negatives import HardNegatives, check_negatives
from mmcl.train.precision import build_autocast
from mmcl.train.run_state import RunState, check_health
from mmcl.train.step import train_step
from mmcl.train.teacher import build_teacher, check_teacher
from mmcl.train.trackers import check_trackers
from mmcl.train.validation import Validation, check_validation_config
from mmcl.train.views import Views, added_rows, check_views

log = logging.getLogger("mmcl.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def fed_kinds(cfg: Config, fed: List[str]) -> Dict[str, str]:
    """Each fed tower's modality -> what it reads (image, text, audio)."""
    return {m: TOWERS.get(cfg.model.towers[m].type).input_kind for m in fed}


def check_config(cfg: Config) -> None:
    """Every component checks its own settings against the towers, before anything is built."""
    config_lib.check_values(cfg)  # again: a config built in Python has not been through load()
    check_model_config(cfg.model)
    frozen = [m for m, tower in cfg.model.towers.items() if frozen_whole(tower)]
    check_data_config(cfg.data, {m: TOWERS.get(t.type).input_kind for m, t in cfg.model.towers.items()}, frozen)
    fed = held_modalities(cfg.data, list(cfg.model.towers))
    check_loss_config(cfg.loss, fed, optional_modalities(cfg.data, fed))
    check_teacher(cfg.loss, cfg.model, optional_modalities(cfg.data, fed))
    check_negatives(cfg, fed_kinds(cfg, fed))
    check_views(cfg, fed_kinds(cfg, fed))
    check_engine_config(cfg.engine, fed, cfg.data.batch_size)
    check_trackers(cfg.run)
    check_probe_config(cfg.eval.linear_probe)
    check_validation_config(cfg)
    check_keep_best(cfg)


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


def open_run_dir(cfg: Config) -> Tuple[Path, Optional[Path], str]:
    """(run directory, checkpoint to resume from or None, the config as YAML), after the checks that
    must pass before any compute: no silent overwrite of a run, evaluation sets present."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_from = checkpoints.resolve(run_dir, cfg.run.resume)
    if resume_from is None and checkpoints.latest(run_dir) is not None:
        raise FileExistsError(
            f"run directory {run_dir} already holds checkpoints: pass run.resume=latest "
            "to continue it, or choose another run.name"
        )
    for root in cfg.eval.datasets:  # a missing evaluation set should stop the run now, not after training
        check_dataset(root)
    config_yaml = config_lib.to_yaml(cfg)
    if dist.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    dist.barrier()  # the run directory exists for every process
    return run_dir, resume_from, config_yaml


def stream_inputs(model: MultiEncoder, cfg: Config, fed: List[str], train: bool = True) -> Dict[str, InputSpec]:
    """What the stream must produce: one input per fed tower, read from the configured shard fields, with a
    placeholder for each modality a sample may lack (`train`: the training preprocessing with data.augment,
    else evaluation's, never augmented), text read as data.captions says."""
    preprocess = model.preprocessors(train, cfg.data.augment)
    optional = optional_modalities(cfg.data, fed)
    inputs = {
        m: InputSpec(
            model.tower(m).input_kind,
            parse_fields(cfg.data.fields[m]),
            preprocess[m],
            model.tower(m).placeholder() if m in optional else None,
        )
        for m in fed
    }
    inputs = caption_inputs(cfg.data, inputs)
    return view_inputs(cfg.data, inputs) if train else inputs  # K augmented views: training only


def step_seed(run: RunConfig, step: int) -> int:
    """The seed of one step's sampled negatives: the same on every process, and again after a resume."""
    return random.Random(f"{run.seed}:{step}").getrandbits(63)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.fed = held_modalities(cfg.data, list(cfg.model.towers))  # the towers fed (others: frozen whole)
        self.device = dist.resolve_device(cfg.engine.device)
        dist.init_from_env(self.device)
        self.run_dir, resume_from, self.config_yaml = open_run_dir(cfg)
        self.hard_negatives = HardNegatives(list(cfg.data.negatives), cfg.data.negatives_per_sample)
        captions = caption_views(cfg.data, fed_kinds(cfg, self.fed))  # K captions per sample
        self.views = Views({**captions, **cfg.data.views})  # and K augmented views
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
        random.seed(cfg.run.seed)
        self.engine = self._build_engine(initialise=resume_from is None)
        self.ema = build_average(self.engine, cfg.optim)  # None unless optim.ema_decay > 0
        contrastive = build_loss(cfg.loss)
        self.loss_fn = with_distillation(contrastive, cfg.loss)
        self.teacher = build_teacher(cfg.loss, cfg.model, cfg.engine.precision, self.device)  # None: no distillation
        self.state, position = RunState(), (0, 0)
        if resume_from is not None:
            position = self._resume(resume_from)
        sources = training_sources(cfg.data, self.fed)
        self.stream = TrainStream(
            cfg.data.train,
            self._inputs(train=True),
            cfg.data.batch_size,
            cfg.data.workers,
            cfg.data.shuffle_buffer,
            cfg.run.seed,
            start=position,
            mixing=build_mixing(cfg.data, sources),
        )
        self.sources = len(sources)
        self.optional = optional_modalities(cfg.data, self.fed)
        self.autocast = build_autocast(cfg.engine.precision, self.device)
        val_inputs = self._inputs(train=False) if cfg.data.val else {}
        # Validation scores the contrastive loss alone: a distillation term would need the teacher there too;
        # it reads one unaugmented view of each sample, and K captions and the negatives as training does.
        self.validation = Validation(
            cfg,
            val_inputs,
            self.optional,
            self.engine,
            contrastive,
            self.autocast,
            self.device,
            Views(captions),
            self.hard_negatives,
        )
        self.best = KeepBest(cfg.run.keep_best, cfg.run.keep_best_mode)
        self.best.restore(self.state, self.run_dir)

    def _inputs(self, train: bool) -> Dict[str, InputSpec]:
        """What the training stream (`train`) or the validation loss reads: the towers' inputs and the hard
        negatives, through the training preprocessing (data.augment too; one view of each negative) or
        the evaluation one."""
        model, data = self.engine.model, self.cfg.data
        preprocess = model.preprocessors(True, data.augment) if train else model.preprocessors(False)
        negatives = negative_inputs(data, preprocess, fed_kinds(self.cfg, self.fed))
        return {**stream_inputs(model, self.cfg, self.fed, train=train), **negatives}

    def _resume(self, checkpoint: Path) -> Tuple[int, int]:
        """Restore the engine, the RNG and the run state from `checkpoint`; this process's stream position."""
        meta = checkpoints.load(checkpoint, self.engine, self.ema)
        self.state = RunState.from_meta(meta)
        if "samples_skipped_per_process" in meta:  # each process's own count (older checkpoints: process 0's)
            self.state.samples_skipped = meta["samples_skipped_per_process"][dist.rank()]
        if checkpoints.run_dir_of(checkpoint).resolve() != self.run_dir.resolve():
            self.state.run_id = RunState().run_id  # another run's checkpoint starts a tracker run of its own
        log.info("resumed from %s at step %d", checkpoint, self.state.step)
        epoch, taken = meta["data_position"][dist.rank()]
        return epoch, taken

    def _build_engine(self, initialise: bool) -> Engine:
        cfg = self.cfg
        model = MultiEncoder(cfg.model)
        if cfg.model.init_from and initialise:
            fresh = load_initial_weights(model, cfg.model.init_from)
            log.info(
                "initialised from %s%s",
                cfg.model.init_from,
                f"; {len(fresh)} parameters start fresh, e.g. {fresh[:3]}" if fresh else "",
            )
        if cfg.engine.compile:
            compile_towers(model)
        self.backward = build_backward(cfg.engine.grad_cache, [m for m in self.fed if not model.trains(m)])
        batch = cfg.data.batch_size
        # The negatives' rows and the views' beyond the first, embedded with the batch's rows.
        extra_rows = added_rows(self.hard_negatives.extra_rows(batch), self.views.extra_rows(batch))
        shape = StepShape(cfg.run.steps, batch, micro_steps(self.backward, self.fed, batch, extra_rows))
        return build_engine(model.to(self.device), cfg.engine, cfg.optim, shape, self.device)

    def train(self) -> RunResult:
        """Train as configured, until run.steps or a stop signal."""
        stop, stopping = StopRequest(), False
        self.engine.model.train()
        config = yaml.safe_load(self.config_yaml)
        with TrainingLog(self.run_dir, self.cfg.run, self.state, dist.rank() == 0, config) as logs:
            for batch in self.stream if self.state.step < self.cfg.run.steps else ():
                metrics = self.train_step(batch)
                metrics.update(self.validation(self.state.step))
                logs.record(self.state, batch, metrics, self.stream.epoch)
                stopping = dist.any_rank(stop.requested)
                done = self.state.step >= self.cfg.run.steps or stopping
                evaluated = not done and self.evaluation_due()
                results = self.evaluate_during_training(logs) if evaluated else None
                best = self.best.observe(self.state, metrics, results, evaluated)
                self.checkpoint(force=stopping or best, best=best)
                if done:
                    break
            if stopping:
                log.warning("stopped at step %d on request; resume with run.resume=latest", self.state.step)
            elif self.cfg.eval.datasets:
                logs.steps_done()
                results = self.evaluate(self.run_dir / "eval.json")
                logs.record_eval(self.state.step, results, during_training=False)
                self.best.observe_final(self.state, results, self.run_dir)
        dist.barrier()
        return RunResult(self.run_dir, self.state.step, stopping)

    def train_step(self, batch: Batch) -> Dict[str, float]:
        inputs = {m: x.to(self.device, non_blocking=True) for m, x in batch.inputs.items()}
        present = {m: batch.present[m].to(self.device) for m in self.optional}
        teacher = {} if self.teacher is None else {"teacher": self.teacher.embed(inputs)}  # once, before the backward
        loss_fn: LossFn = partial(
            self.loss_fn, present=present, seed=step_seed(self.cfg.run, self.state.step), **teacher
        )
        # K views per sample become B*K rows first, so that the negatives' rows follow them.
        inputs, loss_fn = self.views.attach(inputs, loss_fn)
        inputs, loss_fn = self.hard_negatives.attach(inputs, batch.negatives, loss_fn)
        metrics = train_step(self.engine, loss_fn, self.backward, inputs, self.autocast)
        self.state.advance(batch, metrics)
        if self.ema is not None:
            self.ema.update(self.state.step)
        self.state.count_sources(dist.sum_over_ranks(self.drawn_per_source(batch)))
        metrics["nonfinite_steps"] = self.state.nonfinite_steps
        if "loss_scale" in metrics:  # fp16
            metrics["overflow_steps"] = self.state.overflow_steps
        metrics.update({f"samples_source{i}": n for i, n in enumerate(self.state.samples_per_source)})
        check_health(self.state, self.cfg.optim.max_nonfinite_steps, self.cfg.data.max_skipped_fraction)
        return metrics

    def drawn_per_source(self, batch: Batch) -> list:
        """This process's samples of the batch from each source (of data.sources, or "::" part of data.train)."""
        return [batch.sources.count(index) for index in range(self.sources)]

    def checkpoint(self, force: bool = False, best: bool = False) -> None:
        """Collective: a checkpoint every run.checkpoint_every steps, at the last step, or when `force`d;
        `best`: checkpoints/best names it."""
        step = self.state.step
        if not (force or step % self.cfg.run.checkpoint_every == 0 or step == self.cfg.run.steps):
            return
        # Per process: its stream's (epoch, batches taken), and the unreadable samples it skipped.
        positions = dist.all_gather_object(self.stream.position)
        skipped = dist.all_gather_object(self.state.samples_skipped)
        meta = {**asdict(self.state), "data_position": positions, "samples_skipped_per_process": skipped}
        checkpoints.save(
            self.run_dir, step, self.engine, meta, self.config_yaml, self.cfg.run.keep_last, best=best, ema=self.ema
        )

    def evaluation_due(self) -> bool:
        every = self.cfg.eval.every_steps
        return bool(self.cfg.eval.datasets) and bool(every) and self.state.step % every == 0

    def evaluate_during_training(self, logs: TrainingLog) -> Optional[Dict[str, Dict[str, Any]]]:
        results = self.evaluate(self.run_dir / "eval_steps" / f"step_{self.state.step:08d}.json", quiet=True)
        logs.record_eval(self.state.step, results, during_training=True)
        return results

    def evaluate(self, out_path: Path, quiet: bool = False) -> Optional[Dict[str, Dict[str, Any]]]:
        """Evaluate the engine's current weights on eval.datasets (collective: each process embeds its
        share of the shards; process 0 computes, writes and returns the results, the others None), and
        the EMA's beside them (eval_ema.json; its results named ema/<dataset>)."""
        results = self.evaluate_weights(self.engine.model_state(), out_path, quiet)  # collective: gathers ZeRO-3 shards
        if self.ema is None:
            return results
        return with_ema_results(
            results, self.evaluate_weights(self.ema.full_weights(), ema_report_path(out_path), quiet)
        )

    def evaluate_weights(
        self, weights: Dict[str, torch.Tensor], out_path: Path, quiet: bool
    ) -> Optional[Dict[str, Dict[str, Any]]]:
        with torch.random.fork_rng(devices=[]):  # building and running the copy draws nothing from the run's RNG
            model = load_model(self.cfg.model, weights, self.device)
            results = evaluate_all(
                model,
                self.cfg.eval.datasets,
                self.cfg.data.fields,
                self.cfg.eval.batch_size,
                self.cfg.eval.recall_k,
                out_path,
                self.device,
                model_name=self.cfg.run.name,
                progress=self.cfg.run.progress,
                quiet=quiet,
                probe=self.cfg.eval.linear_probe,
            )
        dist.barrier()  # the others wait while process 0 computes the metrics and writes the reports
        return results


def train(cfg: Config) -> RunResult:
    """Train as configured (the config checked first, before any compute)."""
    return Trainer(cfg).train()
