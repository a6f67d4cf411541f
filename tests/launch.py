"""Run a function on N local CPU processes joined in one gloo group, as a launcher would (env://)."""

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

# torchrun starting two local processes (the command line's prefix)
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    # A forked child must not reuse the parent's OpenMP pool (it can hang); one thread each also keeps
    # N processes from oversubscribing the cores.
    torch.set_num_threads(1)
    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    fn(rank, world, *args)


def launch(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` forked processes; raises if any of them fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="fork")


def assert_ranks_equal_one_process(out_dir, loss, grads):
    """Each of 2 processes saved {"loss", "grads"} to out_dir/<rank>.pt: their mean loss is the one-process
    `loss`, and each process's gradients (its weights' change under SGD(lr=1)) are the one-process `grads`."""
    ranks = [torch.load(out_dir / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=0)
    for rank in ranks:
        assert rank["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
