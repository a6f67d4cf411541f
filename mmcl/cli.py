"""`mmcl prep|init|train|eval|convert`: the only place that parses command lines; everything below receives
configs. Errors a user can fix (mmcl.errors.UserError, missing or existing paths) print one line and
exit with status 2; anything else is a defect and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import save_file

from data_prep.digits import prepare_digits
from data_prep.openclipart import prepare_openclipart
from data_prep.pairs import folder_pairs, manifest_pairs, write_pairs
from data_prep.spoken_digits import prepare_spoken_digits
from data_prep.writer import brace_pattern
from mmcl import config as config_lib
from mmcl import dist
from mmcl.accelerate_env import apply_accelerate_settings
from mmcl.checkpoint import convert
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.hf_clip import export_hf_clip, import_hf_clip
from mmcl.errors import ConfigError, DataError, UserError
from mmcl.eval.suite import evaluate_all
from mmcl.models import load_model
from mmcl.train.trainer import train


def _prep(args: argparse.Namespace) -> None:
    if args.source == "digits":
        summary = prepare_digits(
            args.out, args.captions_per_image or 4, args.samples_per_shard, args.test_fraction, args.seed
        )
        print(
            f"digits: {summary['train_images']} training images ({sum(summary['train'].values())} samples, "
            f"{len(summary['train'])} shards), {summary['test_images']} held-out images"
        )
        print(f"train shards: {brace_pattern(Path(args.out) / 'train', len(summary['train']))}")
        return
    if args.source == "spoken-digits":
        summary = prepare_spoken_digits(
            args.out,
            args.clips_per_voice,
            args.captions_per_image or 2,
            args.samples_per_shard,
            args.test_fraction,
            args.seed,
        )
        print(
            f"spoken digits: {summary['train_images']} training images and {summary['train_clips']} clips "
            f"({sum(summary['train'].values())} samples); {summary['test_images']} held-out images paired "
            f"with clips of {summary['test_voices']} held-out voices"
        )
        print(f"train shards: {brace_pattern(Path(args.out) / 'train', len(summary['train']))}")
        return
    if args.source == "openclipart":
        summary = prepare_openclipart(
            args.out,
            args.limit,
            args.image_size,
            args.test_fraction,
            args.seed,
            samples_per_shard=args.samples_per_shard,
        )
        print(
            f"open clip art: {sum(summary['train'].values())} training and {sum(summary['test'].values())} held-out "
            f"drawings in {summary['classes']} categories; {summary['rejected']} rejected (see _stats.json)"
        )
        print(f"train shards: {brace_pattern(Path(args.out) / 'train', len(summary['train']))}")
        return
    if args.source == "folder":
        pairs = folder_pairs(Path(args.input))
    else:
        pairs = manifest_pairs(
            Path(args.input), args.image_column, args.caption_column, args.key_column, args.audio_column
        )
    stats = write_pairs(pairs, args.out, args.samples_per_shard)
    print(
        f"wrote {stats['samples']} samples in {stats['shards']} shards; rejected {stats['rejected']} "
        f"(see {Path(args.out) / '_stats.json'})"
    )
    if not stats["shards"]:
        raise DataError(
            f"{args.input}: no sample to write ({stats['rejected']} rejected; see {Path(args.out) / '_stats.json'})"
        )
    print(f"train shards: {brace_pattern(args.out, int(stats['shards']))}")


STOPPED = 3  # exit status of a run stopped on SIGTERM/SIGUSR1 after checkpointing (schedulers requeue it)


def _train(args: argparse.Namespace) -> int:
    path = config_lib.config_path(args.config)
    cfg = config_lib.load(path, args.overrides)
    # Under `accelerate launch`, its config's engine settings (where ours leave them at their defaults).
    cfg = apply_accelerate_settings(cfg, config_lib.explicit_keys(path, args.overrides))
    result = train(cfg)
    print(f"run directory: {result.run_dir}")
    return STOPPED if result.stopped else 0


def _init(args: argparse.Namespace) -> None:
    out = Path(args.out or f"{args.name}.yaml")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    out.write_text(config_lib.starter_yaml(args.name, args.source))
    print(f"wrote {out}; train with: mmcl train {out}")


def _eval(args: argparse.Namespace) -> None:
    if args.open_clip:  # a plain open_clip architecture + checkpoint file
        model, cfg = convert.open_clip_as_mmcl(args.open_clip, args.checkpoint)
        name, out = args.open_clip, Path(args.out or f"eval-{args.open_clip}.json")
    else:
        path = _checkpoint_dir(Path(args.checkpoint))
        cfg = config_lib.from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
        model, name, out = None, cfg.run.name, Path(args.out) if args.out else path / "eval.json"
    datasets = args.datasets or cfg.eval.datasets
    if not datasets:
        raise ConfigError("no datasets to evaluate: pass --datasets or set eval.datasets in the run's config")
    device = dist.resolve_device(args.device)  # not the run's: a GPU run may be evaluated on a laptop
    model = (
        model.to(device).eval() if model is not None else load_model(cfg.model, checkpoints.load_weights(path), device)
    )
    with torch.no_grad():
        evaluate_all(
            model,
            datasets,
            cfg.data.fields,
            cfg.eval.batch_size,
            cfg.eval.recall_k,
            out,
            device,
            model_name=name,
            progress=not args.quiet,
        )


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint."""
    if (path / "checkpoints").exists():
        latest = checkpoints.latest(path)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
        return latest
    return path


def _convert(args: argparse.Namespace) -> None:
    if args.target == "from-hf":  # a CLIPModel directory -> mmcl weights + config (a checkpoint mmcl can eval)
        state, cfg = import_hf_clip(Path(args.checkpoint))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
        print(f"mmcl weights and config in {out} (evaluate with: mmcl eval {out} --datasets ...)")
        return
    path = _checkpoint_dir(Path(args.checkpoint))
    if args.target == "hf":
        cfg = config_lib.from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
        out = export_hf_clip(checkpoints.load_weights(path), cfg, Path(args.out))
        print(
            f"Hugging Face CLIPModel in {out}; load with:\n"
            f"  transformers.CLIPModel.from_pretrained({str(out)!r}), CLIPTokenizer.from_pretrained({str(out)!r})"
        )
        return
    if args.target == "zero-fp32":
        out = convert.consolidate_zero(path, Path(args.out))
        print(f"consolidated fp32 weights: {out}")
        return
    cfg = config_lib.from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
    name = args.name or cfg.run.name
    config_path, weights = convert.export_open_clip(checkpoints.load_weights(path), cfg, Path(args.out), name)
    print(
        f"open_clip model config {config_path} and weights {weights}; load with:\n"
        f"  open_clip.add_model_config({str(config_path.parent)!r})\n"
        f"  open_clip.create_model({name!r}, pretrained={str(weights)!r})"
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmcl", description="Multimodal contrastive pretraining.")
    commands = root.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="write webdataset shards")
    prep.add_argument("source", choices=["digits", "spoken-digits", "openclipart", "folder", "manifest"])
    prep.add_argument("input", nargs="?", help="folder or manifest (.csv/.jsonl/.parquet); not for the bundled sets")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--samples-per-shard", type=int, default=1000)
    prep.add_argument("--image-column", default="image")
    prep.add_argument("--caption-column", default="caption")
    prep.add_argument("--audio-column", default="audio")
    prep.add_argument("--key-column", default="key")
    prep.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="digits (default 4), spoken-digits (default 2): training samples per image",
    )
    prep.add_argument("--limit", type=int, default=0, help="openclipart: at most this many drawings (0: all)")
    prep.add_argument("--image-size", type=int, default=64, help="openclipart: rendered PNG size")
    prep.add_argument("--clips-per-voice", type=int, default=3, help="spoken-digits: clips per voice and digit")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="digits: held-out share")
    prep.add_argument("--seed", type=int, default=0)
    prep.set_defaults(run=_prep)

    starter = commands.add_parser("init", help="write a starter config for a new run from a bundled one")
    starter.add_argument("name", help="the run's name")
    starter.add_argument(
        "--from",
        dest="source",
        default="digits",
        help=f"a bundled config ({', '.join(config_lib.bundled_names())}) or a config file",
    )
    starter.add_argument("--out", default="", help="the file to write (default: NAME.yaml)")
    starter.set_defaults(run=_init)

    training = commands.add_parser("train", help="train from a YAML config with key.sub=value overrides")
    training.add_argument("config", help="a config file, or the name of a bundled config (digits, ...)")
    training.add_argument("overrides", nargs="*")
    training.set_defaults(run=_train)

    evaluation = commands.add_parser(
        "eval",
        help="zero-shot evaluation of a checkpoint, a run directory, or an "
        "open_clip checkpoint file (with --open-clip ARCHITECTURE)",
    )
    evaluation.add_argument(
        "checkpoint", help="mmcl checkpoint or run directory; with --open-clip, its checkpoint file"
    )
    evaluation.add_argument(
        "--datasets", nargs="*", default=None, help="dataset roots (default: the run's eval.datasets)"
    )
    evaluation.add_argument("--out", default="", help="results JSON (default: eval.json beside the checkpoint)")
    evaluation.add_argument(
        "--open-clip",
        default="",
        metavar="ARCHITECTURE",
        help="evaluate an open_clip model: its architecture name (e.g. ViT-B-32)",
    )
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluation.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to evaluate (auto: a GPU when one is visible)",
    )
    evaluation.set_defaults(run=_eval)
    conversion = commands.add_parser(
        "convert",
        help="export a checkpoint to open_clip or a Hugging Face CLIPModel, "
        "import a CLIPModel, or consolidate ZeRO shards",
    )
    conversion.add_argument("target", choices=["open-clip", "hf", "from-hf", "zero-fp32"])
    conversion.add_argument(
        "checkpoint",
        help="checkpoint directory or run directory (its latest checkpoint); from-hf: a CLIPModel directory",
    )
    conversion.add_argument(
        "--out", required=True, help="open-clip, hf, from-hf: output directory; zero-fp32: output file"
    )
    conversion.add_argument("--name", default="", help="open-clip: model config name (default: the run's name)")
    conversion.set_defaults(run=_convert)
    return root


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prep" and args.source in ("folder", "manifest") and not args.input:
        parser().error(f"prep {args.source} needs an input path")
    try:
        return args.run(args) or 0
    except (UserError, FileNotFoundError, FileExistsError) as error:
        print(f"mmcl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
