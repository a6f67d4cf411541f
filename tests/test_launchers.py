"""Launchers users already use start the same training: torchrun, `accelerate launch` (its config file
mapped onto mmcl's engine settings), and `python -m mmcl` (the resume and SLURM tests use it too)."""

import os
import subprocess
import sys

import pytest
import torch

from mmcl import config as config_lib
from mmcl.accelerate_env import apply_accelerate_settings
from mmcl.errors import ConfigError
from mmcl.train.metrics_log import read_records

from conftest import REPO, tiny_overrides
from launch import TORCHRUN_2, free_port

DEEPSPEED_ZERO2 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  gradient_accumulation_steps: 1
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def training(digits_root, out, name, *extra):
    return [
        "-m",
        "mmcl",
        "train",
        str(REPO / "configs/digits.yaml"),
        *tiny_overrides(
            f"{digits_root}/train/{{000000..000005}}.tar",
            **{"run.output_dir": out, "run.name": name, "run.steps": 6, "data.batch_size": 16, "optim.warmup_steps": 2},
        ),
        *extra,
    ]


def test_accelerate_and_deepspeed_launchers_train_as_torchrun_does(tmp_path, digits_root):
    """Two CPU processes, ZeRO-2, from each launcher: the same losses. `accelerate launch --cpu` would
    start one process (accelerate 1.15 sends every --cpu launch to its single-process launcher unless an
    MPI hostfile is given); its multi-GPU and DeepSpeed launchers are torchrun underneath and start two
    on a CPU machine too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    zero2 = ("engine.backend=deepspeed", "engine.zero_stage=2")
    (tmp_path / "accelerate.yaml").write_text(DEEPSPEED_ZERO2)
    launchers = {
        "torchrun": [
            *TORCHRUN_2,
            *training(digits_root, tmp_path, "torchrun", *zero2),
        ],
        # the engine settings come from accelerate's config file
        "accelerate": [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(tmp_path / "accelerate.yaml"),
            *training(digits_root, tmp_path, "accelerate"),
        ],
        "deepspeed": [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--no_local_rank",
            "--master_port",
            str(free_port()),
            "--module",
            *training(digits_root, tmp_path, "deepspeed", *zero2)[1:],
        ],
    }
    for name, command in launchers.items():
        result = subprocess.run(
            command, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (name, result.stderr[-2000:])
    losses = {name: [r["loss"] for r in read_records(tmp_path / name / "metrics.jsonl")] for name in launchers}
    assert len(losses["torchrun"]) == 6
    assert read_records(tmp_path / "accelerate" / "metrics.jsonl")[-1]["samples_seen"] == 6 * 16 * 2  # 2 processes
    for name in ("accelerate", "deepspeed"):
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(losses["torchrun"]), rtol=0, atol=1e-6)
    stored = config_lib.from_yaml((tmp_path / "accelerate" / "config.yaml").read_text())
    assert (stored.engine.backend, stored.engine.zero_stage) == ("deepspeed", 2)  # from accelerate's config


ENV = {
    "ACCELERATE_MIXED_PRECISION": "bf16",
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "WORLD_SIZE": "2",
}


def test_accelerate_settings_fill_what_the_config_leaves_at_its_defaults():
    cfg = config_lib.load(None, tiny_overrides("x.tar"))
    mapped = apply_accelerate_settings(cfg, config_lib.explicit_keys(None, tiny_overrides("x.tar")), ENV)
    assert (mapped.engine.backend, mapped.engine.zero_stage, mapped.engine.precision) == ("deepspeed", 3, "bf16")
    assert mapped.optim.grad_clip == 1.0
    ddp = apply_accelerate_settings(cfg, [], {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"})
    assert (ddp.engine.backend, ddp.engine.zero_stage, ddp.engine.precision) == ("deepspeed", 0, "fp32")
    # Plain multi-GPU accelerate keeps a configured ZeRO stage, and its default "no" precision keeps bf16.
    zero3_bf16 = [*tiny_overrides("x.tar"), "engine.backend=deepspeed", "engine.zero_stage=3", "engine.precision=bf16"]
    mapped = apply_accelerate_settings(
        config_lib.load(None, zero3_bf16),
        config_lib.explicit_keys(None, zero3_bf16),
        {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"},
    )
    assert (mapped.engine.backend, mapped.engine.zero_stage, mapped.engine.precision) == ("deepspeed", 3, "bf16")
    assert apply_accelerate_settings(cfg, [], {}) is cfg  # not launched by accelerate
    assert apply_accelerate_settings(cfg, [], {"ACCELERATE_LOG_LEVEL": "info", "WORLD_SIZE": "2"}) is cfg


@pytest.mark.parametrize(
    "override, environ, message",
    [
        ("engine.precision=fp32", ENV, r"'engine\.precision': 'fp32' conflicts with the accelerate config.*'bf16'"),
        ("engine.zero_stage=1", ENV, r"'engine\.zero_stage': 1 conflicts .* 3"),
        ("engine.precision=fp32", {**ENV, "ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision=fp16"),
        ("run.steps=3", {**ENV, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "gradient_accumulation_steps=4"),
        ("run.steps=3", {**ENV, "ACCELERATE_USE_FSDP": "true"}, "FSDP"),
        ("run.steps=3", {**ENV, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device"),
        ("run.steps=3", {**ENV, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "dynamo_backend"),
        ("engine.backend=torch", {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"}, "torch runs one process"),
    ],
)
def test_what_conflicts_with_the_accelerate_config_stops_naming_both(override, environ, message):
    overrides = tiny_overrides("x.tar") + [override]
    cfg = config_lib.load(None, overrides)
    with pytest.raises(ConfigError, match=message):
        apply_accelerate_settings(cfg, config_lib.explicit_keys(None, overrides), environ)
