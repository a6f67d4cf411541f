"""Process-group facts and the collectives the losses need (the only torch.distributed user besides the engine).

Every helper is the identity on a single process, so losses run unchanged with or without a group.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives

from mmcl.errors import ConfigError


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
    # torch's functional all-gather (the replacement of torch.distributed.nn's) is differentiable;
    # wait() turns its asynchronous result into a plain tensor.
    group = dist.group.WORLD
    assert group is not None  # a group exists whenever is_distributed()
    gathered = collectives.all_gather_single(local.contiguous(), 0, group)  # (world * B, ...)
    return collectives.wait_tensor(gathered) if isinstance(gathered, collectives.AsyncCollectiveTensor) else gathered


class _RingShift(torch.autograd.Function):
    """Send a tensor to the next rank and receive the previous rank's; gradients travel the other way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.shape = tensor.shape
        return _exchange(
            tensor.contiguous(), send_to=(rank() + 1) % world_size(), recv_from=(rank() - 1) % world_size()
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
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


# Process 0 evaluates and writes checkpoint files while the others wait at a barrier: NCCL's default
# (10 minutes) would abort a run whose evaluation takes longer.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def resolve_device(name: str) -> torch.device:
    """engine.device -> this process's device: "cuda" is the GPU the launcher's LOCAL_RANK names."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key 'engine.device': cuda, but no CUDA device is available")
        return torch.device("cuda", local_rank())
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """The process group's backend for processes computing on `device`: NCCL for GPUs, gloo otherwise.

    NCCL serves CUDA tensors only, so every collective below keeps its tensors on `collective_device()`.
    """
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: torch.device, lone_group: bool = False) -> None:
    """Join the process group a launcher (torchrun, deepspeed, srun) describes in the environment, with
    the backend for the device this process computes on. A process started alone joins nothing, unless
    `lone_group` asks for a group of one (DeepSpeed needs a group even then)."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not lone_group:
            return
        with socket.socket() as probe:  # a free local port for the group's rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for name, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(port)),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
        ):
            os.environ.setdefault(name, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Binding the group to this GPU lets NCCL set up its communicator for it, barriers included.
        dist.init_process_group(backend_for(device), device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)


def collective_device() -> torch.device:
    """The device whose tensors the process group's backend serves: this process's GPU under NCCL."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. a stop signal that reached one process)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(counts: list) -> list:
    """Elementwise sum of every process's list of integer counts (the same length on each)."""
    if not is_distributed():
        return list(counts)
    total = torch.tensor(counts, dtype=torch.int64, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(n) for n in total.tolist()]


def all_gather_object(obj: object) -> list:
    """Every process's value of a small picklable object, in rank order (torch moves its bytes to the
    current GPU under NCCL)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_rows(local: torch.Tensor) -> list:
    """Every process's (rows, ...) tensor, the row counts free to differ, in rank order, on the CPU.

    Without gradients (evaluation): the tensors travel on the collective device, padded to the longest,
    since a collective needs equal shapes and NCCL serves only GPU tensors."""
    if not is_distributed():
        return [local]
    lengths = [int(n) for n in all_gather_object(len(local))]
    padded = torch.zeros((max(*lengths, 1), *local.shape[1:]), dtype=local.dtype, device=collective_device())
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return [part[:n].cpu() for part, n in zip(parts, lengths, strict=True)]
