"""Training-step throughput of mmcl against open_clip's own training step: same model, batch and precision.

mmcl runs its configured engine and step (InfoNCE); the reference is open_clip's model and ClipLoss in a
plain PyTorch step with AdamW, as open_clip's trainer runs it. Both sides use one precision regime:
- fp32:      fp32 weights, no autocast (mmcl: either engine);
- amp_bf16:  fp32 weights, bf16 autocast (mmcl: the torch engine; open_clip: --precision amp_bf16);
- pure_bf16: bf16 weights (mmcl: DeepSpeed bf16, which keeps fp32 master weights in the optimiser and
             runs under autocast as its trainer does; open_clip: --precision pure_bf16, whose AdamW
             steps the bf16 weights themselves and whose layer norms compute in fp32).
After warm-up, the two steps are timed in alternating rounds; the table gives the median samples/s of
each over the rounds, their ratio and, with a known peak, model FLOPs utilisation (training FLOPs
counted by torch's FlopCounterMode on one forward + backward).

    python bench/throughput.py --device cuda --preset ViT-B-16 --batch 256 --precision pure_bf16
    python bench/throughput.py --device cpu --preset mmcl-tiny --batch 128 --precision fp32 --backend torch

With --compile the reference is mmcl's own eager step instead of open_clip's: the same model, engine and
batch, once eager and once with `engine.compile` (each tower through torch.compile), timed alike; the
first compiled step (inductor's compilation) is reported apart and excluded from the rounds.

    python bench/throughput.py --device cpu --preset mmcl-tiny --batch 64 --precision fp32 --backend torch --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmcl.models  # noqa: F401  (registers mmcl's presets as open_clip model configs)

# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# The mmcl engine each regime needs: amp keeps fp32 weights (the torch engine), pure bf16 weights are
# DeepSpeed's.
ENGINE_FOR = {"amp_bf16": "torch", "pure_bf16": "deepspeed"}


def autocast_for(args, side: str) -> torch.autocast:
    """mmcl's trainer autocasts whenever it trains in bf16 (ops autocast keeps in fp32, such as layer norms,
    stay in fp32 on bf16 weights too); open_clip autocasts under amp only."""
    enabled = args.precision != "fp32" if side == "mmcl" else args.precision == "amp_bf16"
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=enabled)


def build_mmcl(args, compiled: bool = False):
    from mmcl import config as config_lib
    from mmcl.losses import build_loss
    from mmcl.models import MultiEncoder
    from mmcl.train.compile import compile_towers
    from mmcl.train.engine import StepShape, build_engine
    from mmcl.train.gradcache import build_backward
    from mmcl.train.step import train_step

    cfg = config_lib.load(
        None,
        [
            "data.train=unused.tar",
            f"data.batch_size={args.batch}",
            f"model.embed_dim={args.embed_dim}",
            "model.towers.image.type=open_clip_vision",
            f"model.towers.image.preset={args.preset}",
            "model.towers.text.type=open_clip_text",
            f"model.towers.text.preset={args.preset}",
            f"engine.backend={args.backend}",
            f"engine.zero_stage={args.zero_stage}",
            f"engine.precision={'fp32' if args.precision == 'fp32' else 'bf16'}",
            f"engine.device={args.device}",
            "optim.warmup_steps=1",
            *args.set,
        ],
    )
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).to(args.device)
    if compiled:  # as the trainer does with engine.compile: before the engine wraps the model
        compile_towers(model)
    total = args.warmup + args.rounds * args.steps
    engine = build_engine(model, cfg.engine, cfg.optim, StepShape(total, args.batch, 1), torch.device(args.device))
    loss_fn, backward = build_loss(cfg.loss), build_backward({})
    return model, lambda inputs: train_step(engine, loss_fn, backward, inputs, autocast_for(args, "mmcl"))


def build_open_clip(args):
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = open_clip.create_model(args.preset, device=args.device, output_dict=True)
    if args.precision == "pure_bf16":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    loss_fn = ClipLoss()
    autocast = autocast_for(args, "open_clip")

    def step(inputs):
        optimizer.zero_grad(set_to_none=True)
        images = inputs["image"].to(torch.bfloat16) if args.precision == "pure_bf16" else inputs["image"]
        with autocast:
            out = model(images, inputs["text"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()

    return model, step


def batch_for(args):
    import open_clip

    cfg = open_clip.get_model_config(args.preset)
    size = cfg["vision_cfg"]["image_size"]
    context = cfg["text_cfg"].get("context_length", 77)
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(args.batch, 3, size, size, generator=g).to(args.device),
        "text": torch.randint(1, 49000, (args.batch, context), generator=g).to(args.device),
    }


def samples_per_second(step, inputs, args) -> float:
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(inputs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - start)


def training_flops(model, inputs, args) -> float:
    """FLOPs of one forward + backward of the towers on the batch (the model FLOPs of MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision != "fp32"):
        image = model.encode("image", inputs["image"])
        text = model.encode("text", inputs["text"])
        (image * text).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="ViT-B-16")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="pure_bf16", choices=["fp32", "amp_bf16", "pure_bf16"])
    parser.add_argument("--backend", default="", choices=["", "deepspeed", "torch"], help="default: the regime's")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each side, alternating")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="default: from the GPU's name")
    parser.add_argument("--compile", action="store_true", help="compare mmcl eager with mmcl compiled instead")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an mmcl config override (optim.fused=false)"
    )
    args = parser.parse_args()
    needed = ENGINE_FOR.get(args.precision)
    if args.backend and needed and args.backend != needed:
        parser.error(f"--precision {args.precision} runs mmcl with --backend {needed}")
    args.backend = args.backend or needed or "deepspeed"
    return args


def timed_once(step, inputs, args) -> float:
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(inputs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_compiled(args, inputs) -> None:
    """mmcl's step eager against the same step with its towers compiled."""
    _, eager_step = build_mmcl(args)
    model, compiled_step = build_mmcl(args, compiled=True)
    first = {"eager": timed_once(eager_step, inputs, args), "compiled": timed_once(compiled_step, inputs, args)}
    for _ in range(args.warmup - 1):
        eager_step(inputs)
        compiled_step(inputs)
    rounds: dict = {"eager": [], "compiled": []}
    for _ in range(args.rounds):  # alternating, so drifts in clock or load touch both alike
        rounds["eager"].append(samples_per_second(eager_step, inputs, args))
        rounds["compiled"].append(samples_per_second(compiled_step, inputs, args))
    eager, compiled = statistics.median(rounds["eager"]), statistics.median(rounds["compiled"])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"device={name} preset={args.preset} batch={args.batch} precision regime={args.precision} "
        f"mmcl engine={args.backend}; median of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"first step: eager {first['eager']:.1f} s, compiled {first['compiled']:.1f} s (compilation)")
    spread = {side: f"rounds {min(r):.1f}..{max(r):.1f}" for side, r in rounds.items()}
    print(f"mmcl eager step:    {eager:9.1f} samples/s ({spread['eager']})")
    print(
        f"mmcl compiled step: {compiled:9.1f} samples/s ({spread['compiled']})   "
        f"ratio compiled/eager = {compiled / eager:.3f}"
    )


def main() -> None:
    args = parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    inputs = batch_for(args)
    if args.compile:
        compare_compiled(args, inputs)
        return
    reference_model, reference_step = build_open_clip(args)
    model, step = build_mmcl(args)
    for _ in range(args.warmup):
        reference_step(inputs)
        step(inputs)
    rounds = {"open_clip": [], "mmcl": []}
    for _ in range(args.rounds):  # alternating, so drifts in clock or load touch both alike
        rounds["open_clip"].append(samples_per_second(reference_step, inputs, args))
        rounds["mmcl"].append(samples_per_second(step, inputs, args))
    reference, ours = statistics.median(rounds["open_clip"]), statistics.median(rounds["mmcl"])
    flops = training_flops(model, inputs, args) / args.batch  # per sample
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)

    engine = f"{args.backend}" + (f" ZeRO-{args.zero_stage}" if args.backend == "deepspeed" else "")
    print(
        f"device={name} preset={args.preset} batch={args.batch} precision regime={args.precision} "
        f"mmcl engine={engine}; median of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"open_clip step: {reference:9.1f} samples/s")
    print(f"mmcl step:      {ours:9.1f} samples/s   ratio mmcl/open_clip = {ours / reference:.3f}")
    print(f"training FLOPs per sample: {flops / 1e9:.2f} GFLOP -> {ours * flops / 1e12:.1f} TFLOP/s achieved")
    if peak and args.precision != "fp32":
        print(f"model FLOPs utilisation: {100 * ours * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
