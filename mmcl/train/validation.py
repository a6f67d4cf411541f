"""The validation loss: the training loss (same loss settings) over held-out shards, data.val, every
eval.val_every steps, logged as val_loss.

The held-out set is read in one fixed order and cut into global batches of data.batch_size x processes,
as training's global batch; each process decodes only its rows of each (`held_out_batches`), and the
loss gathers the embeddings across processes as in training, so each process's value is its share of
the global batch's loss. val_loss is the mean over the full global batches (over eval.val_batches of
them, or all): the same number on every process, and the same for W processes at batch size B as for
one at W x B. A last global batch the set cannot fill is left out: its share would differ in size from
process to process, which the gather cannot take, and a one-sample batch has no negatives.

The model runs in eval mode without gradients and is put back as it was; the RNG states are forked, so
validation draws nothing from the training's random numbers and a run trains bitwise as without it.
"""

from __future__ import annotations

import random
import tarfile
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from mmcl import dist
from mmcl.config import Config
from mmcl.data import Batch, InputSpec, held_out_batches
from mmcl.data.shards import check_local_shards, expand_urls
from mmcl.errors import ConfigError, DataError
from mmcl.train.engine import Engine
from mmcl.train.gradcache import float32
from mmcl.train.views import Views

VAL_LOSS = "val_loss"


def check_validation_config(cfg: Config) -> None:
    """A ConfigError naming the key when data.val and eval.val_every disagree, or when data.val's local
    shards are missing or hold no sample at all."""
    if cfg.eval.val_every and not cfg.data.val:
        raise ConfigError("config key 'eval.val_every': set, but data.val names no held-out shards")
    if cfg.data.val and not cfg.eval.val_every:
        raise ConfigError("config key 'data.val': held-out shards given, but eval.val_every is 0 (never)")
    if not cfg.data.val:
        return
    check_local_shards(cfg.data.val, "data.val")
    local = [Path(url.removeprefix("file:")) for url in expand_urls(cfg.data.val) if "://" not in url]
    local = [path for path in local if not str(path).startswith("pipe:")]
    if local and len(local) == len(expand_urls(cfg.data.val)) and not any(map(_holds_a_file, local)):
        raise ConfigError(f"config key 'data.val': {cfg.data.val!r} names only empty shards (no samples)")


def _holds_a_file(shard: Path) -> bool:
    """Whether a tar shard holds anything (its first header only is read)."""
    try:
        with tarfile.open(shard) as tar:
            return tar.next() is not None
    except tarfile.TarError:
        return True  # unreadable: the reader skips and counts it, as in training


def val_seed(seed: int, index: int) -> int:
    """The seed of a held-out batch's sampled negatives (symile): fixed by run.seed and the batch's
    index, so every validation scores the same negatives, and apart from the training's seeds."""
    return random.Random(f"{seed}:val:{index}").getrandbits(63)


class Validation:
    """`__call__(step)` after each step: {"val_loss": value} when the step is due, else {} (collective)."""

    def __init__(
        self,
        cfg: Config,
        inputs: Dict[str, InputSpec],
        optional: List[str],
        engine: Engine,
        loss_fn: Callable[..., Dict[str, torch.Tensor]],
        autocast: torch.autocast,
        device: torch.device,
        views: Optional[Views] = None,
    ) -> None:
        self.urls, self.every, self.limit = cfg.data.val, cfg.eval.val_every, cfg.eval.val_batches
        self.batch_size, self.seed = cfg.data.batch_size, cfg.run.seed
        self.inputs, self.optional = inputs, optional
        self.engine, self.loss_fn, self.autocast, self.device = engine, loss_fn, autocast, device
        self.views = views or Views({})  # K captions per sample, scored as in training

    def __call__(self, step: int) -> Dict[str, float]:
        if not self.every or step % self.every:
            return {}
        return {VAL_LOSS: self.loss()}

    def loss(self) -> float:
        """The mean loss over the held-out global batches, identical on every process (collective)."""
        model = self.engine.model
        modes = {module: module.training for module in model.modules()}
        cuda = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        python_rng = random.getstate()
        # fork_rng puts torch's generators back afterwards, python's is put back by hand: nothing of the
        # training's random numbers is drawn (eval mode draws none; the forks make sure).
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model.eval()
            # Captions drawn per read (data.captions=one) are drawn alike by every validation.
            torch.default_generator.manual_seed(val_seed(self.seed, -1))
            try:
                total, count = self._sum_over_batches()
            finally:
                for module, training in modes.items():
                    module.train(training)
                random.setstate(python_rng)
        # Every process's sum of its shares, added in rank order: the same float everywhere.
        return sum(dist.all_gather_object(total)) / (count * dist.world_size())

    def _sum_over_batches(self) -> Tuple[float, int]:
        """(this process's sum of its per-batch loss shares, the number of full global batches)."""
        total, count = 0.0, 0
        for batch in self._full_batches():
            inputs = {m: x.to(self.device, non_blocking=True) for m, x in batch.inputs.items()}
            present = {m: batch.present[m].to(self.device) for m in self.optional}
            loss_fn: Callable[..., Dict[str, torch.Tensor]]
            loss_fn = partial(self.loss_fn, present=present, seed=val_seed(self.seed, count))
            inputs, loss_fn = self.views.attach(inputs, loss_fn)  # (B, K, ...) -> B*K rows, (B, K, D) to the loss
            with self.autocast:
                encoded = self.engine.forward(inputs)
            total += float(loss_fn(*float32(encoded))["loss"].double().item())
            count += 1
        if count == 0:
            raise DataError(
                f"data.val {self.urls!r}: no full batch of {self.batch_size} x {dist.world_size()} "
                "process(es) held-out samples to compute val_loss on"
            )
        return total, count

    def _full_batches(self) -> Iterator[Batch]:
        """This process's share of each full global batch, in lockstep with the other processes: each
        batch is voted on, so all stop together at the first global batch any process cannot fill."""
        batches = held_out_batches(self.urls, self.inputs, self.batch_size, dist.rank(), dist.world_size())
        taken = 0
        while not self.limit or taken < self.limit:
            batch: Optional[Batch] = next(batches, None)
            rows = len(batch) if batch is not None else 0
            skipped = batch.skipped if batch is not None else 0
            votes = dist.all_gather_object((rows, skipped))
            if any(s for _, s in votes):  # rows would shift between processes' shares: not the same batches
                raise DataError(
                    f"data.val {self.urls!r}: {sum(s for _, s in votes)} held-out sample(s) unreadable "
                    "(the warnings name them); the validation set must be readable throughout"
                )
            if any(r < self.batch_size for r, _ in votes):
                return
            assert batch is not None
            taken += 1
            yield batch
