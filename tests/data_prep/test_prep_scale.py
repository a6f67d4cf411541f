"""`prep manifest|folder` at scale: several worker processes write the very shards one process writes,
a parquet manifest is read batch by batch, a crashed run finishes on a rerun exactly as an
uninterrupted one (finished shards untouched), and a directory holding another set is refused."""

import csv
import json
import os
import random
import signal
import string
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from braceexpand import braceexpand

import data_prep.pairs as pairs
import data_prep.parallel as parallel
from data_prep.pairs import PairSource, manifest_pairs, write_pairs
from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl.cli import main
from mmcl.errors import DataError

PER_SHARD = 7
ROWS = 63  # 9 chunks of 7 rows
EMPTY_CHUNK = 2  # rows 14..20: every one rejected
POISON_ROW = 30  # chunk 4, third row: its image is poison.png (a valid image, unless a test says otherwise)


def manifest_row(n):
    row = {"key": f"k{n:03d}", "image": f"img{n % 12}.png", "caption": f"digit row {n}"}
    if n == 3:
        row["caption"] = ""
    if n in (5, 22):  # 5 repeats row 4's key in the same shard; 22 repeats row 8's key in another shard
        row["key"] = {5: "k004", 22: "k008"}[n]
    if n == 9 or EMPTY_CHUNK * PER_SHARD <= n < (EMPTY_CHUNK + 1) * PER_SHARD:
        row["image"] = f"missing{n}.png"
    if n == 11:
        row["image"] = "broken.png"
    if n == POISON_ROW:
        row["image"] = "poison.png"
    if n == 40:
        row["image"] = "../outside.png"
    return row


@pytest.fixture
def manifest(tmp_path, digit_pngs):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):
        (root / f"img{i}.png").write_bytes(digit_pngs[i][0])
    (root / "poison.png").write_bytes(digit_pngs[12][0])
    (root / "broken.png").write_bytes(b"not an image")
    (tmp_path / "outside.png").write_bytes(digit_pngs[13][0])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "image", "caption"])
        writer.writeheader()
        writer.writerows(manifest_row(n) for n in range(ROWS))
    return path


def prep(manifest, out, workers=1, per_shard=PER_SHARD, **columns):
    return write_pairs(manifest_pairs(manifest, **columns), out, per_shard, progress=False, workers=workers)


def shard_members(out):
    """Every shard's members, (name, bytes) in tar order, shard by shard: the keys and bytes written."""
    members = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.append([(info.name, tar.extractfile(info).read()) for info in tar.getmembers()])
    return members


def index_files(out):
    return json.loads((out / "sizes.json").read_text()), json.loads((out / "_stats.json").read_text())


def assert_same_set(out, reference):
    assert shard_members(out) == shard_members(reference)
    assert index_files(out) == index_files(reference)
    assert not (out / parallel.STAGING).exists()


def test_two_workers_write_the_samples_one_worker_writes(tmp_path, manifest):
    prep(manifest, tmp_path / "one", workers=1)
    prep(manifest, tmp_path / "two", workers=2)
    assert_same_set(tmp_path / "two", tmp_path / "one")
    sizes, stats = index_files(tmp_path / "one")
    # Shard j holds the valid rows of chunk j; the all-rejected chunk leaves no (empty) shard.
    assert list(sizes.values()) == [5, 5, 7, 7, 6, 7, 7, 7]
    shards = sorted(str(p) for p in (tmp_path / "one").glob("*.tar"))
    assert sorted(braceexpand(brace_pattern(tmp_path / "one", stats["shards"]))) == shards
    keys = [name.split(".")[0] for shard in shard_members(tmp_path / "one") for name, _ in shard[::2]]
    assert keys[:6] == ["k000", "k001", "k002", "k004", "k006", "k007"]
    assert keys.count("k008") == 2  # keys are unique within a shard, not across shards


def test_rejected_rows_land_in_stats(tmp_path, manifest):
    stats = prep(manifest, tmp_path / "out", workers=2)
    _, written = index_files(tmp_path / "out")
    reasons = {entry["source"]: entry["reason"] for entry in written["rejected_inputs"]}
    assert stats["rejected"] == written["rejected"] == len(reasons) == 12
    assert stats["samples"] + stats["rejected"] == stats["rows"] == ROWS
    assert reasons["manifest.csv:4"] == "empty caption"
    assert reasons["manifest.csv:6"] == "duplicate key 'k004'"
    assert reasons["manifest.csv:10"].startswith("missing image")
    assert reasons["manifest.csv:12"].startswith("unreadable image")
    assert "outside" in reasons["manifest.csv:41"]
    assert all(reasons[f"manifest.csv:{n + 1}"].startswith("missing image") for n in range(14, 21))
    assert list(reasons) == sorted(reasons, key=lambda source: int(source.split(":")[1]))  # in row order


def test_parquet_manifest_is_read_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs, "PARQUET_BATCH_ROWS", 250)
    rows = 10_000
    path = tmp_path / "m.parquet"
    # Random captions: compressed, the file is nearly as large as its rows, so reading all of it shows.
    letters = random.Random(0)
    captions = ["".join(letters.choices(string.ascii_letters, k=300)) for _ in range(rows)]
    pq.write_table(
        pa.table({"image": [f"{n}.png" for n in range(rows)], "caption": captions}), path, row_group_size=500
    )
    del captions

    def peaks(read):
        """(Arrow bytes, Python bytes) at their highest while `read` yields."""
        arrow = 0
        tracemalloc.start()
        try:
            for _ in read():
                arrow = max(arrow, pa.total_allocated_bytes())
            return arrow, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole = pq.read_table(path)  # the reference: every row at once, as Arrow columns and as Python rows
    whole_arrow = pa.total_allocated_bytes()
    whole_python = peaks(whole.to_pylist)[1]
    del whole
    streamed_arrow, streamed_python = peaks(lambda: manifest_pairs(path))
    assert streamed_arrow < whole_arrow / 4 and streamed_python < whole_python / 4
    sources = [source for source, *_ in manifest_pairs(path)]
    assert len(sources) == rows and sources[-1] == f"m.parquet:{rows}"


def kill_the_worker_on_poison(monkeypatch):
    """A worker process dies (SIGKILL, as the OOM killer would) while writing the poisoned row's shard."""
    check, test_process = pairs._check, os.getpid()

    def check_or_die(kind, path):
        if path.name == "poison.png":
            if os.getpid() == test_process:
                raise RuntimeError("the poisoned row must be written by a worker process")
            os.kill(os.getpid(), signal.SIGKILL)
        return check(kind, path)

    monkeypatch.setattr(pairs, "_check", check_or_die)


def finished_shards(out):
    """(inode, mtime) of each staged shard a record vouches for and that holds samples."""
    finished = {}
    for record in (out / parallel.STAGING).glob("[0-9]*.json"):
        shard = record.with_suffix(".tar")
        if json.loads(record.read_text())["samples"]:
            finished[shard.name] = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    return finished


def test_a_rerun_after_a_killed_worker_writes_exactly_the_uninterrupted_set(tmp_path, manifest, monkeypatch):
    out = tmp_path / "out"
    kill_the_worker_on_poison(monkeypatch)
    with pytest.raises(Exception, match="terminated abruptly"):  # concurrent.futures' BrokenProcessPool
        prep(manifest, out, workers=2)
    monkeypatch.undo()
    poisoned = POISON_ROW // PER_SHARD
    staging = out / parallel.STAGING
    assert (staging / f"{poisoned:06d}.tar.tmp").exists()  # the half-written shard the worker left
    assert not (out / "_stats.json").exists()
    assert all((staging / f"{j:06d}.json").exists() for j in range(poisoned))  # the chunks before it finished
    kept = finished_shards(out)
    assert len(kept) >= poisoned - 1  # every chunk before the poisoned one, less the empty one
    prep(manifest, out, workers=2)
    prep(manifest, tmp_path / "reference", workers=1)
    assert_same_set(out, tmp_path / "reference")
    final = {(path.stat().st_ino, path.stat().st_mtime_ns) for path in out.glob("*.tar")}
    assert set(kept.values()) <= final  # finished shards were moved into place, never written again


def test_a_crash_while_finishing_is_finished_by_a_rerun(tmp_path, manifest, monkeypatch):
    out = tmp_path / "out"
    move, moved = parallel._move, []

    def move_two_then_fail(staged, final):
        if len(moved) == 2:
            raise OSError("disk full")
        moved.append(final)
        move(staged, final)

    monkeypatch.setattr(parallel, "_move", move_two_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prep(manifest, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    prep(manifest, out, workers=2)
    prep(manifest, tmp_path / "reference")
    assert_same_set(out, tmp_path / "reference")


def unfinished(manifest, out):
    """An interrupted run: its input fails after 10 rows, once chunk 0 is written."""
    source = manifest_pairs(manifest)

    def rows():
        for number, pair in enumerate(source):
            if number == 10:
                raise KeyboardInterrupt
            yield pair

    with pytest.raises(KeyboardInterrupt):
        write_pairs(PairSource(source.identity, rows()), out, PER_SHARD, progress=False)


def test_a_rerun_refuses_a_finished_set_and_other_settings(tmp_path, manifest, capsys):
    prep(manifest, tmp_path / "done")
    with pytest.raises(DataError, match="holds a finished shard set"):
        prep(manifest, tmp_path / "done")
    unfinished(manifest, tmp_path / "half")
    with pytest.raises(DataError, match="samples_per_shard: 7 there, 8 now"):
        prep(manifest, tmp_path / "half", per_shard=8)
    with pytest.raises(DataError, match="caption_column: 'caption' there, 'key' now"):
        prep(manifest, tmp_path / "half", caption_column="key")
    with pytest.raises(DataError, match="negative_image_column: None there, 'caption' now"):
        prep(manifest, tmp_path / "half", negative_image_column="caption")
    with ShardSetWriter(tmp_path / "other", 10) as writer:
        writer.write({"__key__": "a", "txt": "a"})
    (tmp_path / "other" / "_stats.json").unlink()  # an interrupted set of another writer
    with pytest.raises(DataError, match="no _prep/run.json to resume from"):
        prep(manifest, tmp_path / "other")
    command = ["prep", "manifest", str(manifest), "--out", str(tmp_path / "half"), "--no-progress"]
    assert main([*command, "--samples-per-shard", "8"]) == 2
    assert "unfinished prep of other inputs or settings" in capsys.readouterr().err
    assert main([*command, "--samples-per-shard", "7", "--workers", "2"]) == 0  # the same settings resume it
    assert_same_set(tmp_path / "half", tmp_path / "done")
