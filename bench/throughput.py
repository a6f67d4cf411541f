"""Training-step throughput of mmcl against open_clip's own training step, same model, batch and precision.

mmcl: the configured engine (DeepSpeed ZeRO-2 by default) with the InfoNCE loss through mmcl's step.
Reference: open_clip's model and ClipLoss in a plain PyTorch step (autocast, AdamW), as open_clip's
trainer runs it. Prints samples/s of each, their ratio and, with a known peak, model FLOPs utilisation
(training FLOPs counted by torch's FlopCounterMode on one forward + backward).

    python bench/throughput.py --device cuda --preset ViT-B-16 --batch 256 --precision bf16
    python bench/throughput.py --device cpu --preset mmcl-tiny --batch 128 --precision fp32 --backend torch
"""

from __future__ import annotations

import argparse
import time

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def build_mmcl(args):
    from mmcl import config as config_lib
    from mmcl.losses import build_loss
    from mmcl.models import MultiEncoder
    from mmcl.train.engine import build_engine
    from mmcl.train.gradcache import build_backward
    from mmcl.train.step import train_step

    cfg = config_lib.load(None, [
        "data.train=unused.tar", f"data.batch_size={args.batch}", f"model.embed_dim={args.embed_dim}",
        "model.towers.image.type=open_clip_vision", f"model.towers.image.preset={args.preset}",
        "model.towers.text.type=open_clip_text", f"model.towers.text.preset={args.preset}",
        f"engine.backend={args.backend}", f"engine.zero_stage={args.zero_stage}",
        f"engine.precision={args.precision}", f"engine.device={args.device}", "optim.warmup_steps=1"])
    torch.manual_seed(0)
    model = MultiEncoder(cfg.model).to(args.device)
    engine = build_engine(model, cfg, 1, torch.device(args.device))
    loss_fn, backward = build_loss(cfg.loss), build_backward({})
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    return model, lambda inputs: train_step(engine, loss_fn, backward, inputs, autocast)


def build_open_clip(args):
    import open_clip
    from open_clip.loss import ClipLoss

    import mmcl.models  # noqa: F401  (registers mmcl's presets as open_clip model configs)

    torch.manual_seed(0)
    model = open_clip.create_model(args.preset, device=args.device, output_dict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    loss_fn = ClipLoss()
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(inputs):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(inputs["image"], inputs["text"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()

    return model, step


def batch_for(args, model):
    import open_clip

    cfg = open_clip.get_model_config(args.preset)
    size = cfg["vision_cfg"]["image_size"]
    context = cfg["text_cfg"].get("context_length", 77)
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(args.batch, 3, size, size, generator=g).to(args.device),
            "text": torch.randint(1, 49000, (args.batch, context), generator=g).to(args.device)}


def timed(step, inputs, args) -> float:
    for _ in range(args.warmup):
        step(inputs)
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

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        image = model.encode("image", inputs["image"])
        text = model.encode("text", inputs["text"])
        (image * text).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="ViT-B-16")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--backend", default="deepspeed", choices=["deepspeed", "torch"])
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="default: from the GPU's name")
    args = parser.parse_args()

    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    reference_model, reference_step = build_open_clip(args)
    inputs = batch_for(args, reference_model)
    reference = timed(reference_step, inputs, args)
    del reference_model, reference_step
    model, step = build_mmcl(args)
    ours = timed(step, inputs, args)
    flops = training_flops(model, inputs, args) / args.batch  # per sample
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)

    print(f"device={name} preset={args.preset} batch={args.batch} precision={args.precision} "
          f"mmcl engine={args.backend}" + (f" ZeRO-{args.zero_stage}" if args.backend == "deepspeed" else ""))
    print(f"open_clip step: {reference:9.1f} samples/s")
    print(f"mmcl step:      {ours:9.1f} samples/s   ratio mmcl/open_clip = {ours / reference:.3f}")
    print(f"training FLOPs per sample: {flops / 1e9:.2f} GFLOP -> {ours * flops / 1e12:.1f} TFLOP/s achieved")
    if peak and args.precision == "bf16":
        print(f"model FLOPs utilisation: {100 * ours * flops / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
