"""How a step turns a batch into parameter gradients: plain backward, or the gradient cache.

The gradient cache (Gao et al., 2021) makes the contrastive batch independent of activation memory:
1. embed every chunk of every tower without autograd, recording the RNG state before each chunk;
2. compute the loss once on the full (gathered) batch of cached embeddings, and its gradient with
   respect to those embeddings (the logit scale/bias get their gradients here directly);
3. re-embed each chunk with autograd, from the same RNG state, so dropout and random masking draw
   the same numbers, and back-propagate the cached gradient through it (a surrogate <emb, grad>).
The parameter gradients are those of the full-batch loss; memory holds one chunk's activations.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from mmcl.models import Encoded
from mmcl.train.engine import Engine

LossFn = Callable[..., Dict[str, torch.Tensor]]
Backward = Callable[[Engine, LossFn, Mapping[str, torch.Tensor], torch.autocast], Dict[str, torch.Tensor]]
RngState = Tuple[torch.Tensor, object]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def float32(encoded: Encoded) -> Encoded:
    """The loss runs in float32 (or wider): logits reach 100, where bf16 keeps barely two decimal digits."""
    return Encoded(
        {m: _wide(e) for m, e in encoded.embeddings.items()},
        _wide(encoded.logit_scale),
        None if encoded.logit_bias is None else _wide(encoded.logit_bias),
    )


def plain_backward(
    engine: Engine, loss_fn: LossFn, inputs: Mapping[str, torch.Tensor], autocast: torch.autocast
) -> Dict[str, torch.Tensor]:
    with autocast:
        encoded = engine.forward(inputs)
    out = loss_fn(*float32(encoded))
    engine.backward(out["loss"])
    return {**{name: value.detach() for name, value in out.items()}, "logit_scale": encoded.logit_scale.detach()}


def _rng_state() -> RngState:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])  # type: ignore[arg-type]


class GradCache:
    """A `Backward` with per-modality chunk sizes (a modality without one is embedded in one chunk).

    The towers of `frozen` modalities (frozen whole) are embedded once, without a graph, and never
    replayed: no parameter of theirs takes a gradient, and their chunks would add empty micro-steps.
    """

    def __init__(self, chunk_sizes: Mapping[str, int], frozen: Sequence[str] = ()) -> None:
        self.chunk_sizes = dict(chunk_sizes)
        self.frozen = set(frozen)

    def micro_steps(self, modalities: List[str], batch_size: int, extra_rows: Mapping[str, int] = {}) -> int:
        """Backward calls per step: the first chunks of all trained towers together, then one per chunk.
        `extra_rows`: modality -> rows its tower embeds beyond the batch's (hard negatives, extra views)."""
        trained = [m for m in modalities if m not in self.frozen]
        rows = {m: batch_size + extra_rows.get(m, 0) for m in trained}
        return 1 + sum(math.ceil(rows[m] / self.chunk_sizes.get(m, rows[m])) - 1 for m in trained)

    def plan(self, chunks: Mapping[str, tuple]) -> List[List[tuple]]:
        """[(modality, chunk index), ...] per micro-step: all first chunks, then the rest one by one."""
        trained = [m for m in chunks if m not in self.frozen]
        return [[(m, 0) for m in trained]] + [[(m, i)] for m in trained for i in range(1, len(chunks[m]))]

    def __call__(
        self, engine: Engine, loss_fn: LossFn, inputs: Mapping[str, torch.Tensor], autocast: torch.autocast
    ) -> Dict[str, torch.Tensor]:
        chunks = {m: x.split(self.chunk_sizes.get(m, x.shape[0])) for m, x in inputs.items()}
        cached, states = self._embed_without_graph(engine, chunks, autocast)
        after_first_pass = _rng_state()
        cached = float32(cached)
        out, grads = self._loss_and_gradients(loss_fn, cached)
        self._replay(engine, chunks, states, grads, autocast)
        _set_rng_state(after_first_pass)  # the run continues exactly as after one forward pass
        return {**{name: value.detach() for name, value in out.items()}, "logit_scale": cached.logit_scale.detach()}

    @staticmethod
    def _embed_without_graph(
        engine: Engine, chunks: Mapping[str, tuple], autocast: torch.autocast
    ) -> Tuple[Encoded, Dict[str, List[RngState]]]:
        """1. Every chunk embedded without a graph, and the RNG state each chunk started from."""
        states: Dict[str, List[RngState]] = {m: [] for m in chunks}
        parts: Dict[str, List[torch.Tensor]] = {m: [] for m in chunks}
        with torch.no_grad(), autocast:
            for m in chunks:
                for chunk in chunks[m]:
                    states[m].append(_rng_state())
                    encoded = engine.forward({m: chunk})
                    parts[m].append(encoded.embeddings[m])
        embeddings = {m: torch.cat(p) for m, p in parts.items()}  # modality -> (B, D)
        return Encoded(embeddings, encoded.logit_scale, encoded.logit_bias), states

    @staticmethod
    def _loss_and_gradients(
        loss_fn: LossFn, cached: Encoded
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """2. The loss on the whole batch, and its gradient w.r.t. the cached embeddings, scale and bias."""
        leaves = {m: emb.detach().requires_grad_(True) for m, emb in cached.embeddings.items()}
        scale = cached.logit_scale.detach().requires_grad_(True)
        bias = None if cached.logit_bias is None else cached.logit_bias.detach().requires_grad_(True)
        out = loss_fn(leaves, scale, bias)
        names, wrt = [*leaves, "scale"], [*leaves.values(), scale]
        if bias is not None:
            names, wrt = [*names, "bias"], [*wrt, bias]
        grads = dict(zip(names, torch.autograd.grad(out["loss"], wrt), strict=True))
        return out, grads

    def _replay(
        self,
        engine: Engine,
        chunks: Mapping[str, tuple],
        states: Mapping[str, List[RngState]],
        grads: Mapping[str, torch.Tensor],
        autocast: torch.autocast,
    ) -> None:
        """3. Replay the chunks with a graph and push the cached gradient through them.

        The surrogate <emb, g> has d/dparams = g^T d emb/dparams: the chain rule through the cached
        gradient. The first micro-step replays the first chunk of every tower (and carries the scale/bias
        term), so every parameter gets a gradient in it: ZeRO-3 overwrites its gradient buffers on a
        step's first micro-step and adds on later ones, so a parameter first reached later would add onto
        the previous step's gradient.
        """
        grad_chunks = {m: grads[m].split(len(chunks[m][0])) for m in chunks}
        for number, micro_step in enumerate(self.plan(chunks)):
            surrogate: Any = 0.0  # a python number, so the surrogate keeps the (widened) embeddings' dtype
            if not micro_step:  # every tower frozen: the logit scale/bias alone train
                encoded = engine.forward({})
            for m, index in micro_step:
                _set_rng_state(states[m][index])
                with autocast:
                    encoded = engine.forward({m: chunks[m][index]})
                # The product in float32 (or wider), as the loss was: the engine scales the surrogate under
                # fp16, and only the scaled gradient is cast to the embeddings' dtype on its way back.
                # Casting the cached gradient itself to fp16 would zero its small entries (below ~6e-8),
                # the very underflow the loss scale exists to prevent. (B, D) * (B, D) -> ()
                surrogate = surrogate + torch.sum(_wide(encoded.embeddings[m]) * grad_chunks[m][index])
            if number == 0:
                surrogate = surrogate + encoded.logit_scale * grads["scale"]
                if encoded.logit_bias is not None:
                    surrogate = surrogate + encoded.logit_bias * grads["bias"]
            engine.backward(surrogate)


def build_backward(chunk_sizes: Mapping[str, int], frozen: Sequence[str] = ()) -> Backward:
    """Chosen once when training is built: the loop itself never branches on it. `frozen`: the modalities
    whose towers are frozen whole."""
    return GradCache(chunk_sizes, frozen) if chunk_sizes else plain_backward


def micro_steps(backward: Backward, modalities: List[str], batch_size: int, extra_rows: Mapping[str, int] = {}) -> int:
    return backward.micro_steps(modalities, batch_size, extra_rows) if isinstance(backward, GradCache) else 1
