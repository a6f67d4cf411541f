"""What `accelerate launch` hands its processes, mapped onto mmcl's engine settings.

accelerate exports its config file (or its command-line flags) to every process it starts as
ACCELERATE_* variables: the precision, the DeepSpeed plugin's ZeRO stage, gradient clipping and
accumulation, whether to stay on the CPU. mmcl reads those (it needs nothing else of accelerate: its
multi-process launchers are torchrun underneath, whose variables mmcl reads as always). A setting the
config file or the command line leaves at its default takes accelerate's value; one they set to
something else stops the run, naming both settings. (`mixed_precision: no` is accelerate's default, so
it asks for nothing: an mmcl config in bf16 stays in bf16.) What mmcl does not offer (FSDP, Megatron-LM,
torch.compile through accelerate, a DeepSpeed JSON of one's own, fp16 yet) stops it too.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Sequence

from mmcl.config import Config, check_values
from mmcl.errors import ConfigError

UNSUPPORTED = {
    "ACCELERATE_USE_FSDP": "FSDP (mmcl shards with DeepSpeed ZeRO: use its DeepSpeed plugin)",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": "a DeepSpeed config file of its own (mmcl builds DeepSpeed's config "
    "from engine.*: give the ZeRO stage and precision in the accelerate config instead)",
}


def launched_by_accelerate(environ: Mapping[str, str]) -> bool:
    """`accelerate launch` exports its precision to every process it starts, `no` included; other
    ACCELERATE_* variables a shell may hold (a log level, say) are no sign of it."""
    return "ACCELERATE_MIXED_PRECISION" in environ


def accelerate_settings(environ: Mapping[str, str]) -> Dict[str, Any]:
    """mmcl's dotted keys -> the values accelerate asks for; a ConfigError for what mmcl does not offer."""
    for name, what in UNSUPPORTED.items():
        if environ.get(name, "false").lower() not in ("false", "", "none"):
            raise ConfigError(f"accelerate config: {what} is not offered by mmcl")
    for name in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if environ.get(name, "none").lower() not in ("none", ""):
            raise ConfigError(f"accelerate config: DeepSpeed offload ({name.lower()[21:]}) is not offered by mmcl")
    if environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO":
        raise ConfigError("accelerate config: dynamo_backend (torch.compile) is not offered by mmcl; set it to no")
    settings: Dict[str, Any] = {}
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", "bf16"):
        raise ConfigError(f"accelerate config: mixed_precision={precision} is not offered by mmcl (no, bf16)")
    if precision == "bf16":  # "no" is also accelerate's default, so it asks for nothing in particular
        settings["engine.precision"] = "bf16"
    if environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        settings["engine.device"] = "cpu"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        settings["engine.backend"] = "deepspeed"
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in environ:
            settings["engine.zero_stage"] = int(environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    elif int(environ.get("WORLD_SIZE", "1")) > 1:
        # accelerate's plain data parallelism: mmcl's engine for several processes (ZeRO as configured,
        # stage 0 by default, which is plain data parallelism)
        settings["engine.backend"] = "deepspeed"
    clipping = environ.get("ACCELERATE_GRADIENT_CLIPPING", "")
    if clipping and clipping.lower() != "none":
        settings["optim.grad_clip"] = float(clipping)
    accumulation = int(environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1"))
    if accumulation != 1:
        raise ConfigError(
            f"accelerate config: gradient_accumulation_steps={accumulation}; mmcl steps on the whole "
            "batch (data.batch_size per process) and takes batches beyond memory through "
            "engine.grad_cache: set it to 1"
        )
    return settings


def apply_accelerate_settings(
    cfg: Config, explicit: Sequence[str], environ: Optional[Mapping[str, str]] = None
) -> Config:
    """`cfg` with accelerate's settings where the config left them at their defaults; a ConfigError
    naming both settings where the config (file or command line) asks for something else."""
    environ = os.environ if environ is None else environ
    if not launched_by_accelerate(environ):
        return cfg
    for key, wanted in accelerate_settings(environ).items():
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if key in explicit and current != wanted:
            why = " (engine.backend=torch runs one process)" if key == "engine.backend" else ""
            raise ConfigError(
                f"config key {key!r}: {current!r} conflicts with the accelerate config, which asks "
                f"for {wanted!r}{why}; change one of the two"
            )
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: wanted})})
    check_values(cfg)
    return cfg
