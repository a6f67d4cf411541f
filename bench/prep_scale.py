"""Rows/s, CPU and peak memory of `mmcl prep manifest` with 1 and 2 worker processes, at two manifest lengths.

A synthetic parquet manifest of --rows rows (unique keys, varied captions) names a few hundred small
PNG images (32 px), reused across rows; a second manifest is 10 times shorter. Each manifest is prepared
by the real command (`python -m mmcl prep manifest ... --workers W`, a subprocess) with 1 and with 2
workers. rows/s is the command's own figure, over the prep itself (its start-up, mostly imports, left
out). CPU is the process tree's (user + system, start-up included, from getrusage of the waited-for
children), and "cores busy" that CPU over the command's wall time: on a machine whose cores other jobs
already use, a second worker is only as fast as the CPU share the tree gets. Memory is that of the
whole process tree (the command and its workers), sampled every 0.1 s: PSS summed over the processes
(pages the forked workers share with the command counted once, split among them) and RSS summed
(shared pages counted once per process). The 1-worker and 2-worker sets are checked to be the same
(sizes.json, shard sizes); each set is deleted after its run (1M rows write about 2.5 GB).

    python bench/prep_scale.py                  # 1,000,000 and 100,000 rows
    python bench/prep_scale.py --rows 100000 --images 64
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["circle", "square", "triangle", "cloud", "tree", "house", "cat", "boat", "star"]
PLACES = ["on a table", "in the sky", "by the sea", "in a field", "at night", "in the snow"]
BATCH_ROWS = 100_000  # manifest rows built and written at a time


def write_images(folder: Path, count: int) -> None:
    """Smooth random 32 px images (a coarse grid scaled up, plus noise): about 2 KB of PNG each."""
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (32, 32, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        (folder / f"img{index:04d}.png").write_bytes(buffer.getvalue())


def write_manifest(path: Path, rows: int, images: int) -> None:
    """key, image, caption; written batch by batch so the benchmark itself stays small."""
    with pq.ParquetWriter(
        path, pa.schema([("key", pa.string()), ("image", pa.string()), ("caption", pa.string())])
    ) as out:
        for start in range(0, rows, BATCH_ROWS):
            numbers = range(start, min(rows, start + BATCH_ROWS))
            captions = [f"a {COLOURS[n % 8]} {THINGS[n // 8 % 9]} {PLACES[n // 72 % 6]}, picture {n}" for n in numbers]
            batch = {"key": [f"s{n:09d}" for n in numbers], "image": [f"img{n % images:04d}.png" for n in numbers]}
            out.write_table(pa.table({**batch, "caption": captions}))


def tree_memory(process: psutil.Process) -> Tuple[int, int]:
    """(PSS, RSS) summed over a process and its descendants, in bytes."""
    pss = rss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that ended between the listing and the reading
        pss, rss = pss + info.pss, rss + info.rss
    return pss, rss


def run_prep(manifest: Path, out: Path, workers: int, per_shard: int) -> Dict[str, float]:
    """Runs the command, sampling its process tree's memory; returns its rows/s, the tree's CPU seconds,
    the cores it kept busy and its peak PSS/RSS (MiB)."""
    command = [sys.executable, "-m", "mmcl", "prep", "manifest", str(manifest), "--out", str(out)]
    command += ["--workers", str(workers), "--samples-per-shard", str(per_shard), "--no-progress"]
    peaks = [0, 0]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    process = psutil.Process(child.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            try:
                pss, rss = tree_memory(process)
            except psutil.NoSuchProcess:
                return
            peaks[0], peaks[1] = max(peaks[0], pss), max(peaks[1], rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = child.communicate()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command's, with its workers' (it waits for them)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    done.set()
    sampler.join()
    rate = re.search(r"([\d,]+) rows/s", output)
    if child.returncode != 0 or rate is None:
        raise SystemExit(f"{' '.join(command)} failed (status {child.returncode}):\n{output}")
    return {
        "rate": float(rate.group(1).replace(",", "")),
        "cpu": cpu,
        "cores": cpu / seconds,
        "pss": peaks[0] / 2**20,
        "rss": peaks[1] / 2**20,
    }


def shard_sizes(out: Path) -> List[int]:
    return sorted(path.stat().st_size for path in out.glob("*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the long manifest")
    parser.add_argument("--images", type=int, default=256, help="distinct 32 px images the rows name")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--tmp", default=None, help="where the manifests and shards go (default: the system's)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        write_images(root / "data", args.images)
        lengths = {"long": args.rows, "short": args.rows // 10}
        for name, rows in lengths.items():
            write_manifest(root / "data" / f"{name}.parquet", rows, args.images)
        results: Dict[Tuple[str, int], Dict[str, float]] = {}
        for name in ("long", "short"):
            sizes = {}
            for workers in (1, 2):
                out = root / f"{name}-{workers}"
                results[name, workers] = run_prep(
                    root / "data" / f"{name}.parquet", out, workers, args.samples_per_shard
                )
                sizes[workers] = ((out / "sizes.json").read_text(), shard_sizes(out))
                shutil.rmtree(out)
            if sizes[1] != sizes[2]:
                raise SystemExit(f"{name}: 1 and 2 workers wrote different sets")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    columns = ["manifest rows", "workers", "rows/s", "vs 1 worker", "CPU s (tree)", "cores busy"]
    print("\n| " + " | ".join(columns + ["peak PSS (tree)", "peak RSS (tree, summed)"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, workers), result in results.items():
        ratio = result["rate"] / results[name, 1]["rate"]
        print(
            f"| {lengths[name]:,} | {workers} | {result['rate']:,.0f} | {ratio:.2f} | {result['cpu']:,.0f} "
            f"| {result['cores']:.2f} | {result['pss']:,.0f} MiB | {result['rss']:,.0f} MiB |"
        )
    for workers in (1, 2):
        long, short = results["long", workers]["pss"], results["short", workers]["pss"]
        print(
            f"\n{workers} worker(s): peak PSS {long:,.0f} MiB at {args.rows:,} rows, {short:,.0f} MiB at "
            f"{args.rows // 10:,} rows (ratio {long / short:.2f})"
        )


if __name__ == "__main__":
    main()
