"""Training samples/s of a whole `mmcl train` against open_clip_train on the same images and captions.

Both train the model of configs/openclipart.yaml (open_clip's ViT and text transformer at mmcl-tiny's
sizes: 64 px images in 8 px patches, 32 tokens, 128-d embeddings) on the Open Clip Art training drawings,
in fp32, batch 128, one loader worker, the same AdamW settings and warm-up, without evaluation.
open_clip_train reads them in its CSV mode (the shards' PNGs and captions extracted to files, a
tab-separated CSV); mmcl streams the shards themselves.

Measured from outside: each run's log (mmcl's metrics.jsonl, open_clip_train's out.log) is followed as
it is written, every step record stamped on arrival. A run's rate is the samples between its first
record at or after step --skip and its last record, over the time between them: start-up, imports and
the first steps are left out; epoch boundaries (open_clip_train's loader restarts) and data loading
count. The two take turns for --rounds rounds; each one's median counts.

    python bench/end_to_end.py                          # builds data/openclipart first if missing
    python bench/end_to_end.py --steps 300 --rounds 3 --device cuda

Needs pandas (`pip install -e .[bench]`): open_clip_train's CSV reader.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "openclipart.yaml"
OPEN_CLIP_MODEL = "mmcl-tiny-64"  # configs/openclipart.yaml's model, as an open_clip model config
OPEN_CLIP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/")

Record = Tuple[float, int]  # (arrival time, samples trained so far)


def ensure_data(root: Path) -> None:
    if not (root / "train" / "sizes.json").is_file():
        subprocess.run([sys.executable, "-m", "mmcl", "prep", "openclipart", "--out", str(root)], check=True)


def extract_csv(shards: List[Path], out: Path) -> Tuple[Path, int]:
    """The training shards' drawings as PNG files and a tab-separated CSV (filepath, title) of their captions."""
    images = out / "images"
    images.mkdir(parents=True)
    rows = []
    for shard in shards:
        fields: dict = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                fields.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, sample in fields.items():
            path = images / f"{key}.png"
            path.write_bytes(sample["png"])
            caption = sample["txt"].decode().replace("\t", " ").replace("\n", " ")
            rows.append(f"{path}\t{caption}")
    csv = out / "train.csv"
    csv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return csv, len(rows)


def open_clip_model_config(out: Path) -> Path:
    """mmcl-tiny's open_clip config with configs/openclipart.yaml's tower options."""
    preset = json.loads((REPO / "mmcl" / "models" / "presets" / "mmcl-tiny.json").read_text())
    preset["vision_cfg"].update(image_size=64, patch_size=8)
    preset["text_cfg"].update(context_length=32)
    path = out / f"{OPEN_CLIP_MODEL}.json"
    path.write_text(json.dumps(preset))
    return path


def follow(path: Path, parse: Callable[[str], Optional[int]], process: subprocess.Popen) -> List[Record]:
    """Tail `path` while `process` runs: the samples count of every step record, stamped on arrival."""
    records: List[Record] = []
    offset, pending = 0, ""
    while True:
        running = process.poll() is None
        if path.exists():
            with open(path) as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            now = time.perf_counter()
            lines = (pending + chunk).split("\n")
            pending = lines.pop()
            records += [(now, n) for n in map(parse, lines) if n is not None]
        if not running:
            return records
        time.sleep(0.02)


def run(command: List[str], log: Path, parse: Callable[[str], Optional[int]], output: Path) -> List[Record]:
    with open(output, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        records: List[Record] = []
        follower = threading.Thread(target=lambda: records.extend(follow(log, parse, process)))
        follower.start()
        process.wait()
        follower.join()
    if process.returncode != 0:
        tail = "\n".join(output.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{tail}")
    return records


def rate(records: List[Record], first_samples: int) -> float:
    """Samples per second from the first record at or past `first_samples` to the last."""
    timed = [r for r in records if r[1] >= first_samples]
    if len(timed) < 2:
        raise RuntimeError("too few step records to time: raise --steps")
    (start, n0), (end, n1) = timed[0], timed[-1]
    return (n1 - n0) / (end - start)


def mmcl_round(args: argparse.Namespace, work: Path, index: int) -> float:
    name = f"mmcl_{index}"
    command = [
        sys.executable, "-m", "mmcl", "train", str(CONFIG),
        f"data.train={args.data}/train/{{000000..{args.shards - 1:06d}}}.tar",
        f"data.batch_size={args.batch}", f"data.workers={args.workers}",
        f"run.output_dir={work}", f"run.name={name}", f"run.steps={args.steps}",
        f"run.log_every={args.log_every}", f"run.checkpoint_every={args.steps}", "run.progress=false",
        f"engine.device={args.device}", "eval.datasets=[]",
    ]  # fmt: skip

    def samples(line: str) -> Optional[int]:
        return json.loads(line)["samples_seen"] if line.startswith("{") else None

    records = run(command, work / name / "metrics.jsonl", samples, work / f"{name}.out")
    return rate(records, args.skip * args.batch)


def open_clip_round(args: argparse.Namespace, work: Path, index: int, csv: Path, rows: int, model: Path) -> float:
    name = f"open_clip_{index}"
    steps_per_epoch = rows // args.batch  # its CSV loader drops the last partial batch
    command = [
        sys.executable, "-c",
        "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "from open_clip_train.main import main; main(sys.argv[2:])",
        str(model), "--model", OPEN_CLIP_MODEL, "--train-data", str(csv), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(args.batch), "--workers", str(args.workers), "--precision", "fp32",
        "--lr", "1e-3", "--wd", "0.1", "--warmup", "50", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--epochs", str(math.ceil(args.steps / steps_per_epoch)), "--log-every-n-steps", str(args.log_every),
        "--save-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "", "--seed", "0",
        "--device", args.device, "--logs", str(work), "--name", name,
    ]  # fmt: skip

    def samples(line: str) -> Optional[int]:
        match = OPEN_CLIP_LINE.search(line)
        if match is None:
            return None
        epoch, in_epoch = int(match[1]), int(match[2])
        return epoch * steps_per_epoch * args.batch + in_epoch

    records = run(command, work / name / "out.log", samples, work / f"{name}.out")
    return rate(records, args.skip * args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "openclipart")
    parser.add_argument("--shards", type=int, default=6, help="training shards of --data (configs/openclipart.yaml's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150, help="steps of each mmcl run (open_clip: whole epochs)")
    parser.add_argument("--skip", type=int, default=20, help="steps left out of the timing at the start")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ensure_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = [args.data / "train" / f"{i:06d}.tar" for i in range(args.shards)]
        csv, rows = extract_csv(shards, work / "csv")
        model = open_clip_model_config(work)
        mmcl, open_clip = [], []
        for index in range(args.rounds):
            mmcl.append(mmcl_round(args, work, index))
            open_clip.append(open_clip_round(args, work, index, csv, rows, model))
            print(f"round {index + 1}: mmcl {mmcl[-1]:.1f} samples/s, open_clip_train {open_clip[-1]:.1f} samples/s")
    ratio = statistics.median(mmcl) / statistics.median(open_clip)
    print(
        f"{rows} drawings, batch {args.batch}, {args.workers} loader worker(s), {args.device}: mmcl "
        f"{statistics.median(mmcl):.1f} samples/s, open_clip_train {statistics.median(open_clip):.1f} samples/s "
        f"(medians of {args.rounds}): {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
