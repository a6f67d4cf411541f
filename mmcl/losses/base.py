"""What every contrastive loss shares: the call shape, the choice of modality pairs, the gathering.

Call shape: `loss(embeddings, logit_scale, logit_bias=None, negatives=None, present=None, seed=0)`
returns `{"loss": ..., <pair>: ...}`.
- embeddings: modality -> this process's unit-norm rows, (B, D), or (B, K, D) for K views/captions.
- logit_scale: the multiplier (exp of the learnt log-scale); logit_bias: SigLIP's bias, else None.
- negatives: optional modality -> (B, H, D) explicit hard negatives, extra candidates of that modality.
- present: optional modality -> (B,) bool, False where a sample lacks that modality (its row is a
  placeholder). A pair is then scored over the samples that have both, on every process, with the
  same weight per sample as if only those samples had been in the batch.
- seed: the step's seed, the same on every process, for losses that sample negatives (Symile's O(N)
  shuffles), so that a step's draws are reproducible and identical across processes.

Distributed: embeddings are all-gathered with gradients and each process computes only the rows of
its own samples against every process's candidates (the "local loss"). The returned value is the
process's share: the mean over processes equals the single-process loss on the concatenated batch,
and the gradients, summed by the gather's backward and averaged by data parallelism, equal its
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mmcl import dist
from mmcl.config import LossConfig, pair_name, parse_pair
from mmcl.errors import ConfigError

Embeddings = Mapping[str, torch.Tensor]


@dataclass
class LossInputs:
    """One step's loss inputs on this process, as `forward` receives them (see the module docstring)."""

    embeddings: Embeddings  # modality -> (B, D) or (B, K, D)
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor]
    negatives: Embeddings  # modality -> (B, H, D); empty: none
    present: Mapping[str, torch.Tensor]  # modality -> (B,) bool; empty: every sample holds every modality
    seed: int


@dataclass
class PairInputs:
    """Everything a pairwise loss scores for one modality pair (a, b) on this process."""

    local_a: torch.Tensor  # (R, D) or (R, K, D): this process's rows
    local_b: torch.Tensor
    global_a: torch.Tensor  # (C, D) or (C, K, D): every process's rows, gathered with gradients
    global_b: torch.Tensor
    positive: torch.Tensor  # (R,): each local row's own sample among the global rows
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor]
    negatives_a: Optional[torch.Tensor]  # (N, D): explicit hard negatives of modality a, every process's
    negatives_b: Optional[torch.Tensor]


class ContrastiveLoss(nn.Module):
    gathers = True  # whether pair_loss needs every process's embeddings (global_a, global_b)
    takes_missing = True  # whether a pair can be scored over a subset of the batch (see `present`)
    same_modality_negatives = False  # whether `loss.same_modality_negatives` is offered
    takes_negatives = False  # whether explicit hard negatives (`negatives`, data.negatives) are scored
    takes_views = False  # whether (B, K, D) embeddings, K views or captions per sample, are scored

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.check_settings(cfg, "loss")
        self.cfg = cfg

    @classmethod
    def check_settings(cls, cfg: LossConfig, key: str) -> None:
        """A ConfigError naming the key for settings this loss does not offer (whatever the towers)."""
        if cfg.same_modality_negatives and not cls.same_modality_negatives:
            raise ConfigError(
                f"config key '{key}.same_modality_negatives': {cfg.name!r} contrasts across "
                "modalities only (offered by infonce, dcl and hcl)"
            )
        if cfg.view_weight and not cls.takes_views:
            raise ConfigError(
                f"config key '{key}.view_weight': {cfg.name!r} scores one view per sample (offered by multi_positive)"
            )

    @classmethod
    def check(cls, cfg: LossConfig, modalities: Sequence[str], optional: Sequence[str], key: str) -> None:
        """A ConfigError naming the key for settings this loss cannot train with these towers."""
        cls.check_settings(cfg, key)
        for text in cfg.pairs:
            a, b = parse_pair(text, f"{key}.pairs")
            if a not in modalities or b not in modalities:
                raise ConfigError(
                    f"config key '{key}.pairs': {text!r} names a modality without a tower "
                    f"({', '.join(sorted(modalities))})"
                )
        if cfg.anchor and cfg.anchor not in modalities:
            raise ConfigError(
                f"config key '{key}.anchor': {cfg.anchor!r} is not a tower ({', '.join(sorted(modalities))})"
            )
        scored = {frozenset(pair) for pair in pairs_to_score(cfg, modalities)}
        for text in cfg.pair_weights:  # a pair's loss is symmetric: its weight may name it either way round
            if frozenset(parse_pair(text, f"{key}.pair_weights")) not in scored:
                raise ConfigError(f"config key '{key}.pair_weights.{text}': not a pair the loss scores")
        if optional and not cls.takes_missing:
            raise ConfigError(
                f"config key '{key}.name': {cfg.name!r} cannot score batches with missing modalities "
                "(data.optional_modalities, or a source of data.sources lacking a tower's modality)"
            )

    def pairs(self, modalities: List[str]) -> List[Tuple[str, str, float]]:
        """(a, b, weight) for every pair the loss sums: configured pairs, anchor pairs, or all pairs."""
        weights = {frozenset(parse_pair(text)): weight for text, weight in self.cfg.pair_weights.items()}
        return [(a, b, weights.get(frozenset((a, b)), 1.0)) for a, b in pairs_to_score(self.cfg, modalities)]

    def forward(
        self,
        embeddings: Embeddings,
        logit_scale: torch.Tensor,
        logit_bias: Optional[torch.Tensor] = None,
        negatives: Optional[Embeddings] = None,
        present: Optional[Mapping[str, torch.Tensor]] = None,
        seed: int = 0,
    ) -> Dict[str, torch.Tensor]:
        """{"loss": the weighted sum, <part>: each part} (see the module docstring for the arguments)."""
        return self.score(LossInputs(embeddings, logit_scale, logit_bias, negatives or {}, present or {}, seed))

    def score(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        """The pairwise losses: every configured pair, each over the samples holding both modalities."""
        embeddings = inputs.embeddings
        pairs = self.pairs(list(embeddings))
        if not pairs:
            raise ConfigError(f"loss {self.cfg.name!r} found no modality pair among {sorted(embeddings)}")
        if self.gathers:
            gathered, gathered_negatives = gather_all(embeddings, inputs.negatives)
        elif inputs.negatives:
            raise ConfigError(f"loss {self.cfg.name!r} takes no explicit hard negatives in this exchange")
        else:
            gathered, gathered_negatives = dict(embeddings), {}
        global_present = _gather_present(inputs.present) if inputs.present else {}
        parts: Dict[str, torch.Tensor] = {}
        for a, b, _ in pairs:
            require_negatives(
                self.cfg.name, global_batch(embeddings), [inputs.negatives.get(a), inputs.negatives.get(b)]
            )
            pair = _pair_inputs(inputs, gathered, gathered_negatives, a, b)
            parts[pair_name(a, b)] = self._over_present(self.pair_loss, pair, _both_present(global_present, a, b))
        views = {
            pair_name(m, m): self._over_present(self.views_loss, pair, _both_present(global_present, m, m))
            for m, pair in self.view_pairs(inputs, gathered, gathered_negatives).items()
        }
        total = sum(weight * parts[pair_name(a, b)] for a, b, weight in pairs) + self.cfg.view_weight * sum(
            views.values()
        )
        return {"loss": total, **parts, **views}  # type: ignore[dict-item]

    def view_pairs(
        self, inputs: LossInputs, gathered: Embeddings, gathered_negatives: Embeddings
    ) -> Dict[str, PairInputs]:
        """Modality -> its rows against themselves, for each modality whose K >= 2 rows per sample are
        positives of each other (loss.view_weight > 0); scored by `views_loss`."""
        if not self.cfg.view_weight:
            return {}
        return {
            m: _pair_inputs(inputs, gathered, gathered_negatives, m, m)
            for m, local in inputs.embeddings.items()
            if local.ndim == 3 and local.shape[1] > 1
        }

    def _over_present(
        self, loss: Callable[[PairInputs], torch.Tensor], pair: PairInputs, global_rows: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """`loss` of the pair over the samples holding both modalities (`global_rows`, (W*B,) bool, every
        process's; None: every sample)."""
        if global_rows is None:
            return loss(pair)
        if not self.takes_missing:
            raise ConfigError(f"loss {self.cfg.name!r} cannot score batches with missing modalities")
        batch = pair.local_a.shape[0]
        local_rows = global_rows[dist.rank() * batch : (dist.rank() + 1) * batch]  # (B,)
        kept, kept_everywhere = int(local_rows.sum()), int(global_rows.sum())
        if kept == 0 or kept_everywhere < 2:  # nothing to score here (a contrast needs a negative); stay in
            # the graph all the same: every process must run the same backward collectives (the gathers').
            return 0.0 * (pair.global_a.sum() + pair.global_b.sum())
        # Each kept local row's positive: its index among the kept rows of the gathered batch.
        positive = (global_rows.cumsum(0) - 1)[pair.positive][local_rows]
        kept_loss = loss(
            replace(
                pair,
                local_a=pair.local_a[local_rows],
                local_b=pair.local_b[local_rows],
                global_a=pair.global_a[global_rows],
                global_b=pair.global_b[global_rows],
                positive=positive,
            )
        )
        # pair_loss is a mean over this process's kept rows; weight it by their share of all kept rows, so
        # the mean over processes is the mean over every kept row, as on one process.
        return kept_loss * (kept * dist.world_size() / kept_everywhere)

    def pair_loss(self, pair: PairInputs) -> torch.Tensor:
        """Loss of this process's rows of one modality pair (a mean over them)."""
        raise NotImplementedError

    def views_loss(self, pair: PairInputs) -> torch.Tensor:
        """Loss of this process's rows of one modality's K views against every process's (a mean over them)."""
        raise NotImplementedError


def _pair_inputs(
    inputs: LossInputs, gathered: Embeddings, gathered_negatives: Embeddings, a: str, b: str
) -> PairInputs:
    """Modality a's rows against modality b's (a == b: a modality's views against each other)."""
    local = inputs.embeddings[a]
    return PairInputs(
        local,
        inputs.embeddings[b],
        gathered[a],
        gathered[b],
        local_positions(local),
        inputs.logit_scale,
        inputs.logit_bias,
        gathered_negatives.get(a),
        gathered_negatives.get(b),
    )


def pairs_to_score(cfg: LossConfig, modalities: Sequence[str]) -> List[Tuple[str, str]]:
    """The configured pairs, the anchor's pairs, or every pair, among the given modalities."""
    if cfg.pairs:
        chosen = [parse_pair(text) for text in cfg.pairs]
    elif cfg.anchor:
        chosen = [(cfg.anchor, m) for m in modalities if m != cfg.anchor]
    else:
        chosen = list(combinations(sorted(modalities), 2))
    return [(a, b) for a, b in chosen if a in modalities and b in modalities]


def global_batch(embeddings: Embeddings) -> int:
    """Samples in the whole batch: every process holds the same number."""
    return next(iter(embeddings.values())).shape[0] * dist.world_size()


def require_negatives(name: str, batch: int, explicit: Sequence[Optional[torch.Tensor]]) -> None:
    """A contrast needs a negative in each direction: a batch of one sample has none of its own, so each
    modality it scores would need explicit hard negatives, (B, H, D) with H > 0."""
    if batch < 2 and not all(n is not None and n.shape[1] > 0 for n in explicit):
        raise ConfigError(
            f"loss {name!r} has no negatives in a batch of {batch} sample: raise data.batch_size "
            "(or the number of processes) so that every batch holds at least 2"
        )


def gather_all(
    embeddings: Embeddings, negatives: Embeddings
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Every process's embeddings and hard negatives, in one differentiable all-gather.

    One collective, so one reduction in backward: with several gathers the autograd engine would be
    free to run their reductions in a different order on processes whose loss graphs differ (as when
    a process holds no sample of some pair), and the collectives would cross.
    Returns modality -> (W*B, ...) embeddings and modality -> (W*B*H, D) negatives.
    """
    if not dist.is_distributed():
        return dict(embeddings), {m: n.flatten(0, 1) for m, n in negatives.items()}
    tensors = [*embeddings.values(), *negatives.values()]
    widths = [t[0].numel() for t in tensors]
    flat = dist.all_gather_with_grad(torch.cat([t.flatten(1) for t in tensors], dim=1))  # (W*B, sum of widths)
    pieces = [piece.reshape(-1, *t.shape[1:]) for piece, t in zip(flat.split(widths, dim=1), tensors, strict=True)]
    gathered = dict(zip(embeddings, pieces[: len(embeddings)], strict=True))
    gathered_negatives = {m: n.flatten(0, 1) for m, n in zip(negatives, pieces[len(embeddings) :], strict=True)}
    return gathered, gathered_negatives


def _gather_present(present: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every process's presence masks, modality -> (W*B,) bool, in one (gradient-free) all-gather."""
    stacked = torch.stack([rows.to(torch.uint8) for rows in present.values()], dim=1)  # (B, M)
    gathered = dist.all_gather_with_grad(stacked).bool()  # (W*B, M)
    return dict(zip(present, gathered.unbind(dim=1), strict=True))


def _both_present(global_present: Mapping[str, torch.Tensor], a: str, b: str) -> Optional[torch.Tensor]:
    """(W*B,) bool of the samples (on every process) holding both modalities, or None when all do.
    Decided on the gathered masks, so every process takes the same branch."""
    masks = [global_present[m] for m in (a, b) if m in global_present]
    if not masks:
        return None
    rows = masks[0] & masks[-1]
    return None if bool(rows.all()) else rows


def local_positions(local: torch.Tensor) -> torch.Tensor:
    """Column index of each local row's positive among the gathered rows: rank * B + i."""
    batch = local.shape[0]
    return torch.arange(batch, device=local.device) + dist.rank() * batch


def single_view(tensor: torch.Tensor, loss_name: str) -> torch.Tensor:
    if tensor.ndim == 3:
        if tensor.shape[1] != 1:
            raise ConfigError(
                f"loss {loss_name!r} takes one view per sample; use 'multi_positive' for {tensor.shape[1]} views"
            )
        return tensor[:, 0]
    return tensor


class RowwiseLoss(ContrastiveLoss):
    """Losses defined per anchor row over its candidates, symmetrised over the two directions.

    An anchor's candidates are the other modality's rows (its positive and the other samples'), that
    modality's explicit hard negatives, and, with `same_modality_negatives`, the other rows of its own
    modality: the anchor itself is then excluded, so each row has 2C - 2 negatives, as in SimCLR.
    """

    takes_negatives = True

    def pair_loss(self, pair: PairInputs) -> torch.Tensor:
        name = self.cfg.name
        local_a, local_b = single_view(pair.local_a, name), single_view(pair.local_b, name)
        global_a, global_b = single_view(pair.global_a, name), single_view(pair.global_b, name)
        a_to_b = self.direction(local_a, global_b, pair.negatives_b, global_a, pair.positive, pair.logit_scale)  # (R,)
        b_to_a = self.direction(local_b, global_a, pair.negatives_a, global_b, pair.positive, pair.logit_scale)  # (R,)
        return (a_to_b.mean() + b_to_a.mean()) / 2

    def direction(
        self,
        anchors: torch.Tensor,
        others: torch.Tensor,
        other_negatives: Optional[torch.Tensor],
        own: torch.Tensor,
        positive: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """(R,) loss of each anchor row against its candidates (see the class docstring)."""
        candidates = [others] if other_negatives is None else [others, other_negatives]
        if self.cfg.same_modality_negatives:
            candidates.append(own)
        logits = logit_scale * anchors @ torch.cat(candidates).T  # (R, D) x (D, C) -> (R, C)
        negatives = torch.ones_like(logits, dtype=torch.bool).scatter(1, positive[:, None], False)  # (R, C)
        if self.cfg.same_modality_negatives:  # the anchor is not its own negative
            negatives = negatives.scatter(1, (logits.shape[1] - own.shape[0] + positive)[:, None], False)
        return self.row_losses(logits, positive, negatives, logit_scale)

    def row_losses(
        self, logits: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """(R,) loss of each row of `logits` (R, C) = scale * cosines: `positive` (R,) is its positive's
        column, `negatives` (R, C) marks its negatives (every other column unless some are excluded)."""
        raise NotImplementedError


def positive_logits(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, positive[:, None])[:, 0]  # (R, C) -> (R,)


def only(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The logits with every column outside `columns` (R, C) bool set to -inf, so it drops out of sums
    of exponentials."""
    return logits.masked_fill(~columns, float("-inf"))  # (R, C)
