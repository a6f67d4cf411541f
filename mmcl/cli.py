"""`mmcl prep|init|train|eval|convert`: the only place that parses command lines; everything below receives
configs. Errors a user can fix (mmcl.errors.UserError, missing or existing paths) print one line and
exit with status 2; anything else is a defect and keeps its traceback."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file

from data_prep.digit_pairs import prepare_digit_pairs
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
from mmcl.checkpoint.saved_model import SavedModel, checkpoint_dir, load_saved_model, parse_spec, saved_model
from mmcl.errors import ConfigError, DataError, UserError
from mmcl.eval.compare import file_name, model_names, write_comparison
from mmcl.eval.suite import evaluate_all
from mmcl.train.trainer import train


def _prep(args: argparse.Namespace) -> None:
    if args.source == "digits":
        summary = prepare_digits(
            args.out,
            args.captions_per_image or 4,
            args.samples_per_shard,
            args.test_fraction,
            args.seed,
            captions_one_per_line=args.captions_one_per_line,
        )
        print(
            f"digits: {summary['train_images']} training images ({sum(summary['train'].values())} samples, "
            f"{len(summary['train'])} shards), {summary['test_images']} held-out images"
        )
        print(f"train shards: {brace_pattern(Path(args.out) / 'train', len(summary['train']))}")
        return
    if args.source == "digit-pairs":
        summary = prepare_digit_pairs(
            args.out, test_fraction=args.test_fraction, seed=args.seed, train_copies=args.train_copies
        )
        print(f"digit pairs: {summary['images']} images of two held-out digits, 3 captions each, in {args.out}")
        if args.train_copies:
            train = brace_pattern(Path(args.out) / "train", len(summary["train"]))  # type: ignore[arg-type]
            print(f"train shards (neg.txt, neg.png: order-swapped captions and images): {train}")
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
            f"({sum(summary['train_image_text'].values()) + sum(summary['train_audio_text'].values())} samples); "
            f"{summary['test_images']} held-out images paired with clips of {summary['test_voices']} held-out voices"
        )
        for name in ("image_text", "audio_text"):
            shards = brace_pattern(Path(args.out) / "train" / name, len(summary[f"train_{name}"]))
            print(f"train shards ({name}): {shards}")
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
        columns = (args.image_column, args.caption_column, args.key_column, args.audio_column)
        pairs = manifest_pairs(Path(args.input), *columns, args.negatives_column, args.negative_image_column)
    workers = args.workers or os.cpu_count() or 1
    start = time.perf_counter()
    negatives = args.negatives_per_caption if args.negatives == "swap" else 0
    stats = write_pairs(pairs, args.out, args.samples_per_shard, not args.no_progress, workers, negatives)
    seconds = time.perf_counter() - start
    print(
        f"wrote {stats['samples']} samples in {stats['shards']} shards; rejected {stats['rejected']} "
        f"(see {Path(args.out) / '_stats.json'}); {stats['rows']} rows in {seconds:.1f} s with {workers} "
        f"worker(s): {stats['rows'] / seconds:,.0f} rows/s"
    )
    if not stats["shards"]:
        raise DataError(
            f"{args.input}: no sample to write ({stats['rejected']} rejected; see {Path(args.out) / '_stats.json'})"
        )
    print(f"train shards: {brace_pattern(args.out, int(stats['shards']))}")


Results = Dict[str, Dict[str, Any]]  # dataset -> metric -> value, as evaluate_all returns them
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


def _models(specs: List[str], open_clip_architecture: str) -> List[SavedModel]:
    """Every model, checked before any is evaluated: mmcl configs read, open_clip files and architectures
    found, names made distinct."""
    if open_clip_architecture:  # the original form: `FILE --open-clip ARCH`, one file
        if len(specs) != 1:
            raise ConfigError("--open-clip ARCH takes one checkpoint file; name several as ARCH=FILE")
        parsed = [(open_clip_architecture, Path(specs[0]))]
    else:
        parsed = [parse_spec(spec) for spec in specs]
    models = [saved_model(architecture, given) for architecture, given in parsed]
    names = model_names([m.name for m in models], [given for _, given in parsed])
    return [dataclasses.replace(m, name=name) for m, name in zip(models, names, strict=True)]


def _datasets(given: Optional[List[str]], models: List[SavedModel]) -> List[str]:
    """--datasets, else the eval.datasets the mmcl runs name, if they all name the same (open_clip files
    name none)."""
    if given:
        return given
    named = [m.cfg.eval.datasets for m in models if m.cfg is not None]
    if named and any(d != named[0] for d in named):
        runs = ", ".join(f"{m.name}: {m.cfg.eval.datasets}" for m in models if m.cfg is not None)
        raise ConfigError(f"the runs name different eval.datasets ({runs}): pass --datasets")
    if not named or not named[0]:
        raise ConfigError("no datasets to evaluate: pass --datasets or set eval.datasets in the run's config")
    return list(named[0])


def _evaluate(
    model: SavedModel, datasets: List[str], out: Path, device: torch.device, progress: bool
) -> Optional[Results]:
    """The model's results and its usual reports (None on a process other than 0 of a distributed run)."""
    network, cfg = load_saved_model(model, device)
    with torch.no_grad():
        return evaluate_all(
            network,
            datasets,
            cfg.data.fields,
            cfg.eval.batch_size,
            cfg.eval.recall_k,
            out,
            device,
            model_name=model.name,
            progress=progress,
            probe=cfg.eval.linear_probe,
        )


def _eval(args: argparse.Namespace) -> None:
    models = [dataclasses.replace(m, ema=args.ema) for m in _models(args.checkpoint, args.open_clip)]
    datasets = _datasets(args.datasets, models)
    device = dist.resolve_device(args.device)  # not the run's: a GPU run may be evaluated on a laptop
    dist.init_from_env(device)  # under a launcher (torchrun ...), the processes share the evaluation
    if len(models) == 1:
        model = models[0]
        beside = model.path / ("eval_ema.json" if args.ema else "eval.json")  # as the run names its reports
        default = Path(f"eval-{model.architecture}.json") if model.architecture else beside
        _evaluate(model, datasets, Path(args.out) if args.out else default, device, not args.quiet)
        return
    out_dir = Path(args.out or "comparison")
    results = {
        m.name: _evaluate(m, datasets, out_dir / file_name(m.name) / "eval.json", device, not args.quiet)
        for m in models
    }
    complete = {name: r for name, r in results.items() if r is not None}
    if len(complete) < len(results):  # not process 0: the metrics, and so the comparison, are process 0's
        return
    written = write_comparison(complete, out_dir)
    print(written["comparison.md"].read_text())
    print(f"comparison of {len(models)} models written to {out_dir}/: comparison.csv, comparison.md, charts/")


def _convert(args: argparse.Namespace) -> None:
    if args.ema and args.target in ("from-hf", "zero-fp32"):
        raise ConfigError(f"--ema: {args.target} has no EMA weights to take; it applies to open-clip and hf")
    if args.target == "from-hf":  # a CLIPModel directory -> mmcl weights + config (a checkpoint mmcl can eval)
        state, cfg = import_hf_clip(Path(args.checkpoint))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
        print(f"mmcl weights and config in {out} (evaluate with: mmcl eval {out} --datasets ...)")
        return
    path = checkpoint_dir(Path(args.checkpoint))
    if args.target == "hf":
        cfg = config_lib.from_yaml((path / "config.yaml").read_text(), source=str(path / "config.yaml"))
        out = export_hf_clip(checkpoints.load_weights(path, args.ema), cfg, Path(args.out))
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
    config_path, weights = convert.export_open_clip(checkpoints.load_weights(path, args.ema), cfg, Path(args.out), name)
    print(
        f"open_clip model config {config_path} and weights {weights}; load with:\n"
        f"  open_clip.add_model_config({str(config_path.parent)!r})\n"
        f"  open_clip.create_model({name!r}, pretrained={str(weights)!r})"
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmcl", description="Multimodal contrastive pretraining.")
    commands = root.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="write webdataset shards")
    prep.add_argument("source", choices=["digits", "digit-pairs", "spoken-digits", "openclipart", "folder", "manifest"])
    prep.add_argument("input", nargs="?", help="folder or manifest (.csv/.jsonl/.parquet); not for the bundled sets")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--samples-per-shard", type=int, default=1000)
    prep.add_argument("--image-column", default="image")
    prep.add_argument(
        "--caption-column",
        default="caption",
        help="manifest: a string (a CSV cell: one caption, or several on lines of their own) or a list of "
        "strings (JSONL, parquet): several captions, written to txt one per line (data.captions one|all)",
    )
    prep.add_argument("--audio-column", default="audio")
    prep.add_argument("--key-column", default="key")
    prep.add_argument(
        "--workers",
        type=int,
        default=0,
        help="folder, manifest: processes writing shards (default 0: one per CPU core); the shards do not depend "
        "on it. Rerunning an interrupted folder/manifest prep with the same input and settings finishes it",
    )
    prep.add_argument("--no-progress", action="store_true", help="folder, manifest: no progress bar")
    prep.add_argument(
        "--negatives",
        choices=["none", "swap"],
        default="none",
        help="folder, manifest: swap: also write rule-based negative captions (two numbers, else two words of "
        "the (first) caption swapped, NegCLIP-style) as neg.txt, one per line, for data.negatives",
    )
    prep.add_argument(
        "--negatives-column",
        default="",
        help="manifest: a column of each row's negative captions (a list of strings, or a string of one per "
        "line), written to neg.txt for data.negatives; they win over --negatives swap (default: none)",
    )
    prep.add_argument(
        "--negative-image-column",
        default="",
        help="manifest: a column of each row's negative image paths (one, or a list; relative to the manifest "
        "like the image column), written as neg.<ext>, or neg.0.<ext>, neg.1.<ext>, ... for several (default: none)",
    )
    prep.add_argument(
        "--negatives-per-caption", type=int, default=3, help="folder, manifest with --negatives swap: at most this many"
    )
    prep.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="digits (default 4), spoken-digits (default 2): training samples per image",
    )
    prep.add_argument(
        "--captions-one-per-line",
        action="store_true",
        help="digits: one training sample per image, its --captions-per-image phrasings in txt one per line "
        "(for data.captions one or all)",
    )
    prep.add_argument("--limit", type=int, default=0, help="openclipart: at most this many drawings (0: all)")
    prep.add_argument("--image-size", type=int, default=64, help="openclipart: rendered PNG size")
    prep.add_argument("--clips-per-voice", type=int, default=3, help="spoken-digits: clips per voice and digit")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="digits: held-out share")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument(
        "--train-copies",
        type=int,
        default=0,
        help="digit-pairs: also a training split of training images, each ordered pair this many times, with "
        "order-swapped negative captions in neg.txt and images in neg.png (default 0: the test split only)",
    )
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
        help="zero-shot evaluation of checkpoints, run directories or open_clip checkpoint files "
        "(ARCH=FILE, or FILE --open-clip ARCH); several models: also a comparison table and charts",
    )
    evaluation.add_argument(
        "checkpoint",
        nargs="+",
        metavar="MODEL",
        help="an mmcl checkpoint or run directory (RUN/best: its best checkpoint), or an open_clip architecture "
        "and checkpoint file as ARCH=FILE "
        "(e.g. ViT-B-32=ViT-B-32.pt); with --open-clip, one checkpoint file. Several models are compared, each "
        "named by its run.name or ARCH; two models sharing a name are told apart by their paths' stems (NAME-STEM)",
    )
    evaluation.add_argument(
        "--datasets",
        nargs="*",
        default=None,
        help="dataset roots (default: the runs' eval.datasets, when every mmcl run names the same)",
    )
    evaluation.add_argument(
        "--out",
        default="",
        help="one model: results JSON (default: eval.json beside the checkpoint, eval-ARCH.json for open_clip); "
        "several: a directory for each model's reports and the comparison (default: ./comparison)",
    )
    evaluation.add_argument(
        "--open-clip",
        default="",
        metavar="ARCHITECTURE",
        help="evaluate one open_clip checkpoint file: its architecture name (e.g. ViT-B-32); same as ARCH=FILE",
    )
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluation.add_argument("--ema", action="store_true", help="mmcl checkpoints' EMA weights (optim.ema_decay)")
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
        help="checkpoint directory, run directory (its latest checkpoint) or RUN/best; from-hf: a CLIPModel directory",
    )
    conversion.add_argument(
        "--out", required=True, help="open-clip, hf, from-hf: output directory; zero-fp32: output file"
    )
    conversion.add_argument("--name", default="", help="open-clip: model config name (default: the run's name)")
    conversion.add_argument("--ema", action="store_true", help="open-clip, hf: the EMA weights (optim.ema_decay)")
    conversion.set_defaults(run=_convert)
    return root


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prep" and args.source in ("folder", "manifest") and not args.input:
        parser().error(f"prep {args.source} needs an input path")
    if args.command == "prep" and args.source != "manifest" and (args.negatives_column or args.negative_image_column):
        parser().error("--negatives-column and --negative-image-column are columns of a manifest (prep manifest)")
    try:
        return args.run(args) or 0
    except (UserError, FileNotFoundError, FileExistsError) as error:
        print(f"mmcl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
