"""Peak memory and step time of the gradient-cached step against the plain step (tiny towers, CPU or CUDA).

Each (mode, batch) runs in a fresh process: build the mmcl-tiny model, AdamW and a random batch, then
one warm-up step and timed steps. Peak memory is what the steps add above the state before them:
on CPU the resident-set high-water mark (reset through /proc/self/clear_refs), on CUDA
max_memory_allocated. The loss is the tiled InfoNCE (256-row tiles) in both modes, so what is compared
is activation memory, which the gradient cache bounds by the chunk size.

    python bench/gradcache.py                           # batches 128, 1024, 4096, chunk 128
    python bench/gradcache.py --device cuda --batches 1024 16384
"""

from __future__ import annotations

import argparse
import time

from isolated import run_isolated


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(mode: str, batch: int, chunk: int, device: str, steps: int) -> dict:
    import torch

    from mmcl import config as config_lib
    from mmcl.losses import build_loss
    from mmcl.models import MultiEncoder
    from mmcl.train.engine import StepShape, build_engine
    from mmcl.train.gradcache import build_backward, micro_steps
    from mmcl.train.step import train_step

    cfg = config_lib.load(
        None,
        [
            "data.train=unused.tar",
            f"data.batch_size={batch}",
            "model.embed_dim=128",
            "model.towers.image.type=open_clip_vision",
            "model.towers.image.preset=mmcl-tiny",
            "model.towers.text.type=open_clip_text",
            "model.towers.text.preset=mmcl-tiny",
            "loss.name=infonce_tiled",
            "loss.chunk_size=256",
            "optim.warmup_steps=1",
            *([f"engine.grad_cache.image={chunk}", f"engine.grad_cache.text={chunk}"] if mode == "gradcache" else []),
        ],
    )
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).to(device)
    loss_fn = build_loss(cfg.loss)
    backward = build_backward(cfg.engine.grad_cache)
    shape = StepShape(steps, batch, micro_steps(backward, model.modalities, batch))
    engine = build_engine(model, cfg.engine, cfg.optim, shape, torch.device(device))
    inputs = {
        "image": torch.randn(batch, 3, 32, 32, device=device),
        "text": torch.randint(1, 49000, (batch, 16), device=device),
    }
    autocast = torch.autocast(device, enabled=False)

    def step():
        train_step(engine, loss_fn, backward, inputs, autocast)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the high-water mark to the current resident set
        before = _status_kib("VmRSS") * 1024
    step()  # warm-up; also creates the optimiser state
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024) - before
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"peak_bytes": peak, "seconds_per_step": (time.perf_counter() - start) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    mib = 2**20
    rows = {
        (mode, b): run_isolated("gradcache", mode, b, args.chunk, args.device, args.steps)
        for b in args.batches
        for mode in ("plain", "gradcache")
    }
    base = rows[("gradcache", args.batches[0])].get("peak_bytes")
    print(f"device={args.device} model=mmcl-tiny chunk={args.chunk} loss=infonce_tiled")
    print(
        f"{'batch':>6}  {'plain MiB':>9}  {'gradcache MiB':>13}  {'gc / gc@first':>13}  "
        f"{'plain s':>7}  {'gradcache s':>11}  {'time ratio':>10}"
    )
    for b in args.batches:
        plain, cached = rows[("plain", b)], rows[("gradcache", b)]

        def cell(row, key, scale, spec):
            return format(row[key] / scale, spec) if key in row else "failed"

        growth = format(cached["peak_bytes"] / base, "13.2f") if base and "peak_bytes" in cached else "-"
        ratio = (
            format(cached["seconds_per_step"] / plain["seconds_per_step"], "10.2f")
            if "seconds_per_step" in cached and "seconds_per_step" in plain
            else "-"
        )
        print(
            f"{b:>6}  {cell(plain, 'peak_bytes', mib, '9.0f')}  {cell(cached, 'peak_bytes', mib, '13.0f')}  "
            f"{growth}  {cell(plain, 'seconds_per_step', 1, '7.2f')}  "
            f"{cell(cached, 'seconds_per_step', 1, '11.2f')}  {ratio}"
        )
        for mode, row in (("plain", plain), ("gradcache", cached)):
            if "error" in row:
                print(f"        {mode} at {b}: {row['error']}")


if __name__ == "__main__":
    main()
