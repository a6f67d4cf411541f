"""How the training step scales: with the batch size (plain and gradient-cached), and with processes.

1. Batch: the mmcl-tiny step at growing global batches, plain and with the gradient cache (chunk 128),
   each in a fresh process (bench/gradcache.py's measurement): seconds per step, per-sample time
   relative to the smallest batch, and peak memory.
2. Processes: the same step under DeepSpeed ZeRO-2 on 1, 2 and 4 CPU processes (gloo, launched by
   torchrun), a fixed batch per process (weak scaling), threads split evenly over the cores: samples/s
   in all and the efficiency against one process, which is the reference measured in this run.

    python bench/scaling.py                                  # batches 64..2048, processes 1 2 4
    python bench/scaling.py --batches 128 512 --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from isolated import run_isolated

HERE = Path(__file__).resolve().parent


def process_worker(per_process_batch: int, steps: int) -> None:
    """Run under torchrun: time ZeRO-2 steps, rank 0 prints one JSON line."""
    import torch

    from mmcl import config as config_lib
    from mmcl import dist
    from mmcl.losses import build_loss
    from mmcl.models import MultiEncoder
    from mmcl.train.engine import StepShape, build_engine
    from mmcl.train.gradcache import plain_backward
    from mmcl.train.step import train_step

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_from_env(torch.device("cpu"))
    cfg = config_lib.load(
        None,
        [
            "data.train=unused.tar",
            f"data.batch_size={per_process_batch}",
            "model.embed_dim=128",
            "model.towers.image.type=open_clip_vision",
            "model.towers.image.preset=mmcl-tiny",
            "model.towers.text.type=open_clip_text",
            "model.towers.text.preset=mmcl-tiny",
            "engine.backend=deepspeed",
            "engine.zero_stage=2",
            "engine.device=cpu",
            "optim.warmup_steps=1",
        ],
    )
    torch.manual_seed(dist.rank())
    model = MultiEncoder(cfg.model)
    engine = build_engine(
        model, cfg.engine, cfg.optim, StepShape(cfg.run.steps, per_process_batch, 1), torch.device("cpu")
    )
    loss_fn = build_loss(cfg.loss)
    inputs = {
        "image": torch.randn(per_process_batch, 3, 32, 32),
        "text": torch.randint(1, 49000, (per_process_batch, 16)),
    }
    autocast = torch.autocast("cpu", enabled=False)
    for _ in range(2):  # warm-up: optimiser state, communication buffers
        train_step(engine, loss_fn, plain_backward, inputs, autocast)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, loss_fn, plain_backward, inputs, autocast)
    dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    if dist.rank() == 0:
        print(json.dumps({"seconds_per_step": seconds, "samples_per_s": per_process_batch * world / seconds}))


def run_processes(world: int, per_process_batch: int, steps: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        str(HERE / "scaling.py"),
        "--worker",
        str(per_process_batch),
        str(steps),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--per-process-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        process_worker(*args.worker)
        return

    mib = 2**20
    print(f"batch scaling: mmcl-tiny, cpu, chunk {args.chunk}; per-sample time relative to batch {args.batches[0]}")
    print(f"{'batch':>6}  {'mode':>9}  {'s/step':>7}  {'ms/sample':>9}  {'relative':>8}  {'peak MiB':>8}")
    first = {}
    for batch in args.batches:
        for mode in ("plain", "gradcache"):
            row = run_isolated("gradcache", mode, batch, min(args.chunk, batch), "cpu", args.steps)
            if "error" in row:
                print(f"{batch:>6}  {mode:>9}  failed: {row['error']}")
                continue
            per_sample = row["seconds_per_step"] / batch
            first.setdefault(mode, per_sample)
            print(
                f"{batch:>6}  {mode:>9}  {row['seconds_per_step']:7.2f}  {1000 * per_sample:9.2f}  "
                f"{per_sample / first[mode]:8.2f}  {row['peak_bytes'] / mib:8.0f}"
            )

    print(
        f"\nprocess scaling: DeepSpeed ZeRO-2 on gloo, {args.per_process_batch} samples per process, "
        f"{os.cpu_count()} cores shared"
    )
    print(f"{'processes':>9}  {'s/step':>7}  {'samples/s':>9}  {'vs 1 process':>12}  {'efficiency':>10}")
    base = None
    for world in args.processes:
        row = run_processes(world, args.per_process_batch, args.steps)
        if "error" in row:
            print(f"{world:>9}  failed: {row['error']}")
            continue
        if world == 1:
            base = row["samples_per_s"]
        speedup = row["samples_per_s"] / base if base else float("nan")
        print(
            f"{world:>9}  {row['seconds_per_step']:7.2f}  {row['samples_per_s']:9.0f}  {speedup:12.2f}  "
            f"{speedup / world:10.2f}"
        )


if __name__ == "__main__":
    main()
