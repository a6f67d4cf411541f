"""`mmcl prep digits --captions-one-per-line`: each training image once, its phrasings one per line (the
very phrasings the default layout writes as separate samples); the held-out split unchanged."""

import tarfile
from pathlib import Path

from mmcl.cli import main


def read_shards(folder: Path) -> dict:
    """key -> {field: bytes} over every shard of a folder."""
    samples: dict = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def test_training_samples_hold_every_phrasing_one_per_line(tmp_path):
    common = ["prep", "digits", "--captions-per-image", "3", "--samples-per-shard", "2000"]
    assert main([*common, "--out", str(tmp_path / "apart")]) == 0
    assert main([*common, "--captions-one-per-line", "--out", str(tmp_path / "lines")]) == 0
    apart, lines = read_shards(tmp_path / "apart" / "train"), read_shards(tmp_path / "lines" / "train")
    assert len(apart) == 3 * len(lines) == 3 * 1437
    for key, sample in lines.items():
        phrasings = [apart[f"{key}_{k}"]["txt"].decode() for k in range(3)]
        assert sample["txt"].decode().split("\n") == phrasings and len(set(phrasings)) == 3
        assert sample["png"] == apart[f"{key}_0"]["png"]
    assert read_shards(tmp_path / "lines" / "test") == read_shards(tmp_path / "apart" / "test")
