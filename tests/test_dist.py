"""The GPU path, checked without a GPU: the process group's backend follows the configured device, and
every collective a training run issues (mmcl's gathers, the stop vote, checkpoint metadata, DeepSpeed's
ZeRO reductions) keeps its tensors on the device that backend serves. NCCL serves CUDA tensors only,
so a CPU tensor in any of them would stop a multi-GPU run at its first step."""

import json

import pytest
import torch
import torch.distributed as torch_dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmcl import config as config_lib
from mmcl import dist
from mmcl.errors import ConfigError
from mmcl.train.trainer import Trainer

from conftest import tiny_overrides
from launch import launch


def test_the_backend_follows_the_device_each_process_computes_on():
    assert dist.backend_for(torch.device("cuda", 1)) == "nccl"
    assert dist.backend_for(torch.device("cpu")) == "gloo"  # engine.device=cpu on a GPU machine too


def test_devices_come_from_the_config():
    assert dist.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="engine.device"):
            dist.resolve_device("cuda")


def test_without_a_group_the_collective_device_is_the_cpu():
    assert not dist.is_distributed() and dist.collective_device() == torch.device("cpu")


class CollectiveRecorder(TorchDispatchMode):
    """Every c10d collective dispatched inside it, with the devices of its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")):
            devices = {str(t.device) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.calls.append((name, sorted(devices)))
        return func(*args, **(kwargs or {}))


def recorded_run(rank, world, overrides, out_dir):
    trainer = Trainer(config_lib.load(None, overrides))
    recorder = CollectiveRecorder()
    with recorder:
        trainer.train()
    (out_dir / f"{rank}.json").write_text(
        json.dumps(
            {
                "calls": recorder.calls,
                "backend": torch_dist.get_backend(),
                "collective_device": str(dist.collective_device()),
                "engine_device": str(trainer.device),
            }
        )
    )
    torch_dist.destroy_process_group()


def test_every_collective_of_a_run_keeps_its_tensors_on_the_collective_device(tmp_path, digits_root):
    """Two processes, ZeRO-2, the gradient cache, presence masks, a checkpoint each step."""
    overrides = tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": tmp_path,
            "run.name": "collectives",
            "run.steps": 2,
            "run.checkpoint_every": 1,
            "data.batch_size": 8,
            "data.optional_modalities": "[image]",
            "engine.backend": "deepspeed",
            "engine.zero_stage": 2,
            "engine.grad_cache.image": 4,
        },
    )
    launch(recorded_run, 2, overrides, tmp_path)
    for rank in (0, 1):
        run = json.loads((tmp_path / f"{rank}.json").read_text())
        assert run["backend"] == "gloo" and run["collective_device"] == run["engine_device"] == "cpu"
        names = {name for name, _ in run["calls"]}
        # The recorder sees mmcl's and DeepSpeed's collectives alike: the embeddings' and masks' gathers,
        # the stop vote, ZeRO's gradient reductions, the checkpoint's barriers and object gathers.
        assert {
            "_c10d_functional.all_gather_into_tensor.default",
            "c10d.allreduce_.default",
            "c10d.barrier.default",
            "c10d.allgather_.default",
        } <= names, names
        for name, devices in run["calls"]:
            assert devices in ([], [run["collective_device"]]), (name, devices)
