"""The first thing to run on a GPU node: a two-process NCCL smoke run of the paths a real run takes, then
the throughput and MFU benchmark, as one short report.

Checks, on 2 processes (GPUs 0 and 1, NCCL, bf16; or with --device cpu, 2 CPU processes, gloo, fp32):
1. training runs: DeepSpeed ZeRO-2 with the gradient cache on the bundled digits set, checkpointing;
2. resume is exact: a run stopped at its checkpoint and resumed draws the very samples of an
   uninterrupted run and follows its losses (bitwise in fp32 on CPU; within bf16 rounding on GPUs);
3. throughput: bench/throughput.py (mmcl against open_clip's step, same model, batch and precision).

    python bench/gpu_check.py                    # on a node with 2 GPUs
    python bench/gpu_check.py --device cpu       # the same run on 2 CPU processes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def environment(device: str) -> dict:
    facts = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        facts.update(
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            cuda=torch.version.cuda,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            bf16=torch.cuda.is_bf16_supported(),
        )
    return facts


def train(args, shards: str, out: Path, name: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """`mmcl train` on 2 processes under torchrun, ZeRO-2 and the gradient cache."""
    overrides = [
        f"data.train={shards}",
        "data.batch_size=32",
        "data.workers=1",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"run.steps={steps}",
        "run.checkpoint_every=4",
        "run.log_every=1",
        "run.log_samples=true",
        "run.progress=false",
        "eval.datasets=[]",
        "engine.backend=deepspeed",
        "engine.zero_stage=2",
        f"engine.device={args.device}",
        f"engine.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
        "engine.grad_cache.image=8",
        "engine.grad_cache.text=16",
        # A constant rate after warm-up, so a run of N steps is the first N steps of a longer one.
        "optim.schedule=constant",
        "optim.warmup_steps=2",
        *extra,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mmcl",
        "train",
        str(REPO / "configs/digits.yaml"),
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=3600)


def records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def smoke(args, work: Path) -> dict:
    from data_prep.digits import prepare_digits
    from data_prep.writer import brace_pattern

    summary = prepare_digits(work / "digits", captions_per_image=1, samples_per_shard=250, seed=0)
    data = brace_pattern(work / "digits" / "train", len(summary["train"]))
    checks = {}
    whole = train(args, data, work, "whole", args.steps)
    done = records(work / "whole" / "metrics.jsonl")
    checks["train"] = {
        "ok": whole.returncode == 0 and len(done) == args.steps,
        "detail": f"{len(done)} steps on 2 processes, ZeRO-2, gradient cache, checkpoints"
        if whole.returncode == 0
        else whole.stderr.strip().splitlines()[-3:],
    }
    if not checks["train"]["ok"]:
        return checks
    first = train(args, data, work, "resumed", args.steps // 2)
    second = train(args, data, work, "resumed", args.steps, "run.resume=latest")
    got, want = records(work / "resumed" / "metrics.jsonl"), records(work / "whole" / "metrics.jsonl")
    same_samples = all(
        records(work / "resumed" / f"samples_rank{r}.jsonl") == records(work / "whole" / f"samples_rank{r}.jsonl")
        for r in (0, 1)
    )
    tolerance = 2e-2 if args.device == "cuda" else 1e-6  # bf16 weights; the reductions' order
    worst = max((abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, want, strict=False)), default=1.0)
    resumed = first.returncode == 0 and second.returncode == 0 and len(got) == len(want) == args.steps
    checks["resume"] = {
        "ok": resumed and same_samples and worst <= tolerance,
        "detail": f"same samples: {same_samples}, largest relative loss difference {worst:.2e} "
        f"(allowed {tolerance:.0e})",
    }
    checks["learns"] = {
        "ok": want[-1]["loss"] < want[0]["loss"],
        "detail": f"loss {want[0]['loss']:.3f} -> {want[-1]['loss']:.3f}",
    }
    return checks


def bench(args) -> dict:
    if args.device == "cuda":
        options = ["--preset", "ViT-B-16", "--batch", "256", "--precision", "pure_bf16"]
    else:
        options = ["--preset", "mmcl-tiny", "--batch", "64", "--precision", "fp32", "--rounds", "2", "--steps", "3"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "throughput.py"), "--device", args.device, *options],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("device=", "open_clip", "mmcl", "training", "model"))
    ]
    return {"ok": result.returncode == 0, "detail": lines or result.stderr.strip().splitlines()[-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=8, help="steps of each smoke run (resumed at half)")
    parser.add_argument("--no-bench", action="store_true", help="skip the throughput benchmark")
    parser.add_argument("--out", default="", help="a folder to keep the runs and gpu_check.json in")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"gpu_check needs 2 GPUs, found {torch.cuda.device_count()}; --device cpu runs the same checks on CPU")
        return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="mmcl-gpu-check-"))
    report = {"environment": environment(args.device), "checks": smoke(args, work)}
    if not args.no_bench:
        report["checks"]["throughput"] = bench(args)
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["environment"]))
    for name, check in report["checks"].items():
        detail = check["detail"] if isinstance(check["detail"], str) else "\n      ".join(check["detail"])
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {name}: {detail}")
    print(f"report: {work / 'gpu_check.json'}")
    return 0 if all(check["ok"] for check in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
