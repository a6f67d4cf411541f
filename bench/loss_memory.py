"""Peak memory and time of the tiled InfoNCE against open_clip's ClipLoss (forward + backward).

Each measurement runs in a fresh process. On CPU, peak memory is the process's peak resident set minus
that of an identical process that only builds the inputs; on CUDA it is max_memory_allocated minus the
inputs. Prints a table with the ratios tiled / open_clip.

    python bench/loss_memory.py                      # batches 4096, 16384, 32768 at dim 512 on CPU
    python bench/loss_memory.py --device cuda --batches 16384 65536
"""

from __future__ import annotations

import argparse
import resource
import time

from isolated import run_isolated


def measure(impl: str, batch: int, dim: int, device: str, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from mmcl.config import LossConfig
    from mmcl.losses import build_loss

    torch.manual_seed(0)
    a = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if impl == "open_clip":
        loss = ClipLoss()(a, b, scale)
    elif impl == "tiled":
        loss = build_loss(LossConfig(name="infonce_tiled", chunk_size=chunk))({"image": a, "text": b}, scale)["loss"]
    if impl != "inputs":
        loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    gib = 2 ** 30
    print(f"device={args.device} dim={args.dim} chunk={args.chunk}  (peak = memory above the inputs)")
    print(f"{'batch':>6}  {'open_clip GiB':>13}  {'tiled GiB':>9}  {'mem ratio':>9}  {'open_clip s':>11}  {'tiled s':>7}  {'time ratio':>10}")
    for batch in args.batches:
        inputs = run_isolated('loss_memory', "inputs", batch, args.dim, args.device, args.chunk) if args.device == "cpu" else {"peak_bytes": 0}
        rows = {impl: run_isolated('loss_memory', impl, batch, args.dim, args.device, args.chunk) for impl in ("open_clip", "tiled")}
        cells = {}
        for impl, row in rows.items():
            if "error" in row:
                cells[impl] = (None, None)
            else:
                cells[impl] = ((row["peak_bytes"] - inputs["peak_bytes"]) / gib, row["seconds"])
        (ref_mem, ref_s), (tiled_mem, tiled_s) = cells["open_clip"], cells["tiled"]

        def fmt(value, spec):
            return format(value, spec) if value is not None else "failed"

        mem_ratio = tiled_mem / ref_mem if ref_mem and tiled_mem is not None else None
        time_ratio = tiled_s / ref_s if ref_s and tiled_s is not None else None
        print(f"{batch:>6}  {fmt(ref_mem, '13.2f')}  {fmt(tiled_mem, '9.2f')}  {fmt(mem_ratio, '9.3f')}  "
              f"{fmt(ref_s, '11.2f')}  {fmt(tiled_s, '7.2f')}  {fmt(time_ratio, '10.2f')}")
        for impl, row in rows.items():
            if "error" in row:
                print(f"        {impl} at {batch}: {row['error']}")


if __name__ == "__main__":
    main()
