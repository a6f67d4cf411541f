"""Process-group facts and the collectives the losses need (the only torch.distributed user besides the engine).

Every helper is the identity on a single process, so losses run unchanged with or without a group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, differentiable.

    The backward of the gather sums, onto each rank's local tensor, the gradients that every rank's
    loss sends to that rank's rows: exactly the gradient of the sum of all ranks' losses.
    """
    if not is_distributed():
        return local
    return torch.cat(dist_fn.all_gather(local), dim=0)  # world x (B, ...) -> (world * B, ...)


class _RingShift(torch.autograd.Function):
    """Send a tensor to the next rank and receive the previous rank's; gradients travel the other way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = tensor.shape
        return _exchange(tensor.contiguous(), send_to=(rank() + 1) % world_size(), recv_from=(rank() - 1) % world_size())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _exchange(grad.contiguous(), send_to=(rank() - 1) % world_size(), recv_from=(rank() + 1) % world_size())


def _exchange(tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def ring_shift_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The previous rank's tensor (rank r receives from r-1), differentiable."""
    return _RingShift.apply(tensor) if is_distributed() else tensor
