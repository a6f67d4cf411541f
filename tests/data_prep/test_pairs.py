"""data_prep from manifests and folders: valid pairs written, every bad input reported, none written."""

import csv
import json
import tarfile

import pytest

from data_prep.pairs import folder_pairs, manifest_pairs, write_pairs
from mmcl.data import InputSpec, build_eval_loader
from mmcl.errors import DataError


@pytest.fixture
def image_root(tmp_path, digit_pngs):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, (png, _) in enumerate(digit_pngs[:5]):
        (root / f"d{i}.png").write_bytes(png)
    (root / "sub" / "x.y.png").write_bytes(digit_pngs[5][0])  # dots in a name must not break keys
    (root / "broken.png").write_bytes(b"not an image")
    (tmp_path / "outside.png").write_bytes(digit_pngs[6][0])
    return root


def rejected_inputs(out):
    """_stats.json's rejected rows (write_pairs returns the counts only: the list may be long)."""
    return json.loads((out / "_stats.json").read_text())["rejected_inputs"]


def read_keys_and_captions(out):
    inputs = {"text": InputSpec("text", ["txt"], lambda t: __import__("torch").tensor(len(t)))}
    keys = []
    for batch in build_eval_loader(str(out / "000000.tar"), inputs, batch_size=100):
        keys += [k.split("#")[1] for k in batch.keys]
    return keys


def test_csv_manifest_reports_bad_rows(tmp_path, image_root):
    manifest = image_root / "manifest.csv"
    rows = [
        {"key": "a", "image": "d0.png", "caption": "handwritten zero"},
        {"key": "b", "image": "d1.png", "caption": "a one"},
        {"key": "b", "image": "d2.png", "caption": "duplicate key"},
        {"key": "c", "image": "missing.png", "caption": "no file"},
        {"key": "d", "image": "../outside.png", "caption": "escapes the root"},
        {"key": "e", "image": "broken.png", "caption": "corrupt"},
        {"key": "f", "image": "d3.png", "caption": ""},
        {"key": "g", "image": "sub/x.y.png", "caption": "nested"},
    ]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "shards"
    stats = write_pairs(manifest_pairs(manifest), out, samples_per_shard=100, progress=False)
    assert stats["samples"] == 3
    reasons = {r["source"]: r["reason"] for r in rejected_inputs(out)}
    assert len(reasons) == 5 and stats["rejected"] == 5
    assert "duplicate key" in reasons["manifest.csv:3"]
    assert "missing image" in reasons["manifest.csv:4"]
    assert "outside" in reasons["manifest.csv:5"]
    assert "unreadable image" in reasons["manifest.csv:6"]
    assert "empty caption" in reasons["manifest.csv:7"]
    assert json.loads((out / "_stats.json").read_text())["rejected"] == 5
    assert read_keys_and_captions(out) == ["a", "b", "g"]


def test_jsonl_manifest_with_custom_columns(tmp_path, image_root):
    manifest = image_root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": f"d{i}.png", "text": f"digit {i}"}) for i in range(4)) + "\n")
    out = tmp_path / "shards"
    stats = write_pairs(manifest_pairs(manifest, "path", "text"), out, samples_per_shard=3, progress=False)
    assert stats["samples"] == 4 and stats["shards"] == 2
    with tarfile.open(out / "000000.tar") as tar:
        assert sorted(tar.getnames())[:2] == ["000000001.png", "000000001.txt"]


def test_parquet_manifest(tmp_path, image_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = image_root / "m.parquet"
    pq.write_table(pa.table({"image": ["d0.png", "d1.png", "gone.png"], "caption": ["zero", "one", "two"]}), manifest)
    stats = write_pairs(manifest_pairs(manifest), tmp_path / "shards", progress=False)
    assert stats["samples"] == 2 and rejected_inputs(tmp_path / "shards")[0]["source"] == "m.parquet:3"


def test_manifest_missing_column_is_a_clear_error(tmp_path, image_root):
    manifest = image_root / "m.jsonl"
    manifest.write_text(json.dumps({"file": "d0.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="'image'"):
        write_pairs(manifest_pairs(manifest), tmp_path / "s", progress=False)


def test_folder_with_sidecar_captions(tmp_path, image_root):
    for i in range(3):
        (image_root / f"d{i}.txt").write_text(f"caption {i}\n")
    (image_root / "sub" / "x.y.txt").write_text("nested caption")
    out = tmp_path / "shards"
    stats = write_pairs(folder_pairs(image_root), out, progress=False)
    assert stats["samples"] == 4  # d0..d2 and sub/x.y; d3, d4 lack captions; broken.png is unreadable
    assert stats["rejected"] == 3
    assert sorted(read_keys_and_captions(out)) == ["d0", "d1", "d2", "sub__x_y"]


def audio_bytes(fmt="WAV", seconds=0.2):
    import io

    import numpy as np
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, 0.3 * np.sin(np.arange(int(16000 * seconds)) * 0.1), 16000, format=fmt)
    return out.getvalue()


def shard_fields(out):
    import tarfile

    fields = {}
    with tarfile.open(out / "000000.tar") as tar:
        for name in tar.getnames():
            key, ext = name.split(".", 1)
            fields.setdefault(key, set()).add(ext)
    return fields


def test_manifest_with_audio_and_images(tmp_path, image_root):
    (image_root / "hello.wav").write_bytes(audio_bytes())
    (image_root / "hello.flac").write_bytes(audio_bytes("FLAC"))
    (image_root / "bad.wav").write_bytes(b"RIFF not really audio")
    rows = [
        {"key": "both", "image": "d0.png", "audio": "hello.flac", "caption": "a zero, said aloud"},
        {"key": "sound", "image": "", "audio": "hello.wav", "caption": "hello"},
        {"key": "picture", "image": "d1.png", "audio": "", "caption": "a one"},
        {"key": "corrupt", "image": "", "audio": "bad.wav", "caption": "noise"},
        {"key": "neither", "image": "", "audio": "", "caption": "nothing"},
    ]
    manifest = image_root / "media.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    stats = write_pairs(manifest_pairs(manifest), out, progress=False)
    assert shard_fields(out) == {"both": {"png", "flac", "txt"}, "sound": {"wav", "txt"}, "picture": {"png", "txt"}}
    reasons = {r["source"]: r["reason"] for r in rejected_inputs(out)}
    assert stats["rejected"] == 2
    assert "unreadable audio" in reasons["media.jsonl:4"] and reasons["media.jsonl:5"] == "no image or audio"


def test_folder_with_audio(tmp_path):
    (tmp_path / "bird.ogg").write_bytes(audio_bytes("OGG"))
    (tmp_path / "bird.txt").write_text("a bird sings")
    (tmp_path / "dog.flac").write_bytes(audio_bytes("FLAC"))  # no caption: rejected
    write_pairs(folder_pairs(tmp_path), tmp_path / "shards", progress=False)
    assert shard_fields(tmp_path / "shards") == {"bird": {"ogg", "txt"}}
    assert rejected_inputs(tmp_path / "shards") == [{"source": "dog.flac", "reason": "empty caption"}]
