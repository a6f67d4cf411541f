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

from typing import Callable, Dict, List, Mapping

import torch

from mmcl.models import MultiEncoder

LossFn = Callable[..., Dict[str, torch.Tensor]]
Backward = Callable[[MultiEncoder, LossFn, Mapping[str, torch.Tensor], torch.autocast], Dict[str, torch.Tensor]]


def plain_backward(model: MultiEncoder, loss_fn: LossFn, inputs: Mapping[str, torch.Tensor],
                   autocast: torch.autocast) -> Dict[str, torch.Tensor]:
    with autocast:
        out = loss_fn(model(inputs), model.scale(), model.logit_bias)
    out["loss"].backward()
    return {name: value.detach() for name, value in out.items()}


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class GradCache:
    """A `Backward` with per-modality chunk sizes (a modality without one is embedded in one chunk)."""

    def __init__(self, chunk_sizes: Mapping[str, int]) -> None:
        self.chunk_sizes = dict(chunk_sizes)

    def __call__(self, model: MultiEncoder, loss_fn: LossFn, inputs: Mapping[str, torch.Tensor],
                 autocast: torch.autocast) -> Dict[str, torch.Tensor]:
        modalities = [m for m in model.modalities if m in inputs]
        chunks = {m: inputs[m].split(self.chunk_sizes.get(m, inputs[m].shape[0])) for m in modalities}

        # 1. Embed without a graph, remembering the RNG state each chunk started from.
        states: Dict[str, List[tuple]] = {m: [] for m in modalities}
        cached: Dict[str, torch.Tensor] = {}
        with torch.no_grad(), autocast:
            for m in modalities:
                parts = []
                for chunk in chunks[m]:
                    states[m].append(_rng_state())
                    parts.append(model.encode(m, chunk))
                cached[m] = torch.cat(parts)  # (B, D)
        after_first_pass = _rng_state()

        # 2. The loss on the whole batch; its gradient w.r.t. the cached embeddings.
        leaves = {m: emb.detach().requires_grad_(True) for m, emb in cached.items()}
        with autocast:
            out = loss_fn(leaves, model.scale(), model.logit_bias)
        out["loss"].backward()  # also accumulates the logit scale/bias gradients

        # 3. Replay each chunk with a graph and push the cached gradient through it.
        for m in modalities:
            grads = leaves[m].grad.split(self.chunk_sizes.get(m, inputs[m].shape[0]))
            for chunk, state, grad in zip(chunks[m], states[m], grads):
                _set_rng_state(state)
                with autocast:
                    emb = model.encode(m, chunk)  # (chunk, D)
                # d<emb, g>/d params = g^T d emb / d params: the chain rule through the cached gradient.
                torch.sum(emb * grad.to(emb.dtype)).backward()
        _set_rng_state(after_first_pass)  # the run continues exactly as after one forward pass
        return {name: value.detach() for name, value in out.items()}


def build_backward(chunk_sizes: Mapping[str, int]) -> Backward:
    """Chosen once when training is built: the loop itself never branches on it."""
    return GradCache(chunk_sizes) if chunk_sizes else plain_backward
