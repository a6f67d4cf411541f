"""Shards written by data_prep's writer, read back by mmcl.data: round trip, bad data, splitting."""

import json
import pickle
from collections import Counter

import pytest
import torch

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl.data import InputSpec, TrainStream, build_eval_loader, expand_urls, read_sizes
from mmcl.data.decode import SampleError, decode_field
from mmcl.data.shards import shard_order


def image_size(image):
    return torch.tensor(image.size)


def text_length(text):
    return torch.tensor(len(text))


INPUTS = {"image": InputSpec("image", ["png", "jpg"], image_size), "text": InputSpec("text", ["txt"], text_length)}


class Exploding:
    """Unpickling this runs code: proof that a shard's pickle was executed."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('a pickle from a shard was executed')",))


def write_set(out, digit_pngs, per_shard=8):
    with ShardSetWriter(out, per_shard) as writer:
        for i, (png, label) in enumerate(digit_pngs):
            writer.write({"__key__": f"s{i:03d}", "png": png, "txt": f"handwritten {label}"})
    return writer


def test_round_trip_with_sizes_and_stats(tmp_path, digit_pngs):
    writer = write_set(tmp_path, digit_pngs[:20])
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 8, "000001.tar": 8, "000002.tar": 4}
    stats = json.loads((tmp_path / "_stats.json").read_text())
    assert stats["samples"] == 20 and stats["shards"] == 3 and stats["fields"] == {"png": 20, "txt": 20}
    urls = brace_pattern(tmp_path, len(writer.sizes))
    assert read_sizes(expand_urls(urls)) == 20
    batches = list(build_eval_loader(urls, INPUTS, batch_size=6))
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    assert batches[0].inputs["image"].shape == (6, 2) and (batches[0].inputs["image"] == 8).all()
    keys = [k.split("#")[1] for b in batches for k in b.keys]
    assert keys == [f"s{i:03d}" for i in range(20)]
    assert sum(b.skipped for b in batches) == 0


def test_bad_samples_are_skipped_and_counted_never_unpickled(tmp_path, digit_pngs):
    good = digit_pngs[:6]
    with ShardSetWriter(tmp_path, 100) as writer:
        for i, (png, label) in enumerate(good):
            writer.write({"__key__": f"ok{i}", "png": png, "txt": f"digit {label}"})
        writer.write({"__key__": "garbage", "png": b"\x89PNG not really", "txt": "x"})
        writer.write({"__key__": "truncated", "png": good[0][0][:40], "txt": "x"})
        writer.write({"__key__": "emptytext", "png": good[0][0], "txt": "   "})
        writer.write({"__key__": "latin1", "png": good[0][0], "txt": "caf\xe9".encode("latin-1")})
        writer.write({"__key__": "notext", "png": good[0][0]})
        writer.write(
            {"__key__": "pickled", "png": good[1][0], "txt": "a pickle rides along", "pyd": pickle.dumps(Exploding())}
        )
    batches = list(build_eval_loader(str(tmp_path / "000000.tar"), INPUTS, batch_size=100))
    keys = [k.split("#")[1] for k in batches[0].keys]
    assert keys == [f"ok{i}" for i in range(6)] + ["pickled"]  # the .pyd field is ignored, not executed
    assert batches[0].skipped == 5


def test_truncated_tar_is_skipped_and_counted(tmp_path, digit_pngs):
    write_set(tmp_path, digit_pngs[:16], per_shard=8)
    shard = tmp_path / "000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # cut mid-member
    batches = list(build_eval_loader(brace_pattern(tmp_path, 2), INPUTS, batch_size=100))
    assert sum(len(b) for b in batches) >= 8  # every sample of the intact shard survives
    assert sum(b.skipped for b in batches) >= 1


def test_decode_prefers_fields_in_order(digit_pngs):
    sample = {"txt": b"caption", "text": b"other"}
    assert decode_field(sample, "text", ["text", "txt"]) == "other"
    with pytest.raises(SampleError, match="no image field"):
        decode_field(sample, "image", ["jpg"])


def test_input_spec_refuses_fields_that_cannot_hold_the_kind():
    with pytest.raises(ValueError, match="pyd"):
        InputSpec("image", ["pyd"], image_size)


def test_shard_order_is_seeded_per_epoch():
    urls = [f"{i}.tar" for i in range(20)]
    assert shard_order(urls, 0, 0) == shard_order(urls, 0, 0)
    assert shard_order(urls, 0, 0) != shard_order(urls, 0, 1)
    assert sorted(shard_order(urls, 3, 5)) == sorted(urls)


def test_workers_split_shards_without_repeats(tmp_path, digit_pngs):
    write_set(tmp_path, digit_pngs[:32], per_shard=4)  # 8 shards
    urls = brace_pattern(tmp_path, 8)
    batches = list(build_eval_loader(urls, INPUTS, batch_size=3, workers=2))
    keys = Counter(k for b in batches for k in b.keys)
    assert len(keys) == 32 and set(keys.values()) == {1}


def test_train_stream_is_endless_seeded_and_epoch_shuffled(tmp_path, digit_pngs):
    write_set(tmp_path, digit_pngs[:32], per_shard=4)
    urls = brace_pattern(tmp_path, 8)

    def first_batches(seed, n):
        stream = iter(TrainStream(urls, INPUTS, batch_size=8, workers=0, shuffle_buffer=16, seed=seed))
        return [next(stream).keys for _ in range(n)]

    run = first_batches(seed=1, n=12)  # 3 epochs of 4 full batches
    assert run == first_batches(seed=1, n=12)  # reproducible
    assert run != first_batches(seed=2, n=12)
    epoch0, epoch1 = sorted(sum(run[:4], [])), sorted(sum(run[4:8], []))
    assert epoch0 == epoch1 and len(set(epoch0)) == 32  # each epoch sees every sample once
    assert run[:4] != run[4:8]  # in a new order
