"""Peak memory and time of mmcl's InfoNCE (plain and tiled) against open_clip's ClipLoss, forward + backward.

Each (loss, batch) runs in a fresh process: warm-up passes, then timed repeats, whose median time is
reported. On CPU, peak memory is the process's peak resident set (VmHWM) minus that of an identical process
that only builds the inputs; on CUDA it is max_memory_allocated minus the inputs. Ratios are against
open_clip's ClipLoss.

    python bench/loss_memory.py                      # batches 4096, 16384, 32768 at dim 512 on CPU
    python bench/loss_memory.py --device cuda --batches 16384 65536
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from isolated import run_isolated

LOSSES = ("open_clip", "infonce", "infonce_tiled")


def measure(impl: str, batch: int, dim: int, device: str, chunk: int, warmup: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from mmcl.config import LossConfig
    from mmcl.losses import build_loss

    torch.manual_seed(0)
    a = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    if impl == "open_clip":
        loss_fn = ClipLoss()
    elif impl != "inputs":
        mmcl_loss = build_loss(LossConfig(name=impl, chunk_size=chunk))
        loss_fn = lambda a, b, scale: mmcl_loss({"image": a, "text": b}, scale)["loss"]  # noqa: E731
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = []
    for index in range(warmup + repeats if impl != "inputs" else 0):
        start = time.perf_counter()
        loss_fn(a, b, scale).backward()
        a.grad = b.grad = scale.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # this process image's peak resident set (ru_maxrss would carry over the parent's from the fork)
        with open("/proc/self/status") as status:
            peak = int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024
    return {"seconds": statistics.median(seconds) if seconds else 0.0, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024, help="rows of logits the tiled loss holds at once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gib = 2**30
    print(
        f"device={args.device} dim={args.dim} chunk={args.chunk}; peak = memory above the inputs, "
        f"time = median of {args.repeats} forward + backward passes after {args.warmup} warm-up"
    )
    print(f"{'batch':>6}  {'loss':>14}  {'peak GiB':>8}  {'mem ratio':>9}  {'seconds':>8}  {'time ratio':>10}")
    for batch in args.batches:
        common = (batch, args.dim, args.device, args.chunk, args.warmup, args.repeats)
        inputs = run_isolated("loss_memory", "inputs", *common) if args.device == "cpu" else {"peak_bytes": 0}
        rows = {impl: run_isolated("loss_memory", impl, *common) for impl in LOSSES}
        reference = rows["open_clip"]
        for impl, row in rows.items():
            if "error" in row:
                print(f"{batch:>6}  {impl:>14}  failed: {row['error']}")
                continue
            peak = (row["peak_bytes"] - inputs["peak_bytes"]) / gib
            ok = "error" not in reference
            mem_ratio = f"{peak / ((reference['peak_bytes'] - inputs['peak_bytes']) / gib):9.3f}" if ok else "-"
            time_ratio = f"{row['seconds'] / reference['seconds']:10.2f}" if ok else "-"
            print(f"{batch:>6}  {impl:>14}  {peak:8.2f}  {mem_ratio:>9}  {row['seconds']:8.2f}  {time_ratio:>10}")


if __name__ == "__main__":
    main()
