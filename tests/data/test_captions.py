"""Several captions per sample from the shards (data.captions): one per line or a JSON list -> one drawn
per read (`one`), or K rows per sample, (B, K, ...) (`all`); unusable caption lists skipped and counted."""

import json
from dataclasses import replace

import pytest
import torch

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl import config as config_lib
from mmcl.config import DataConfig
from mmcl.data import InputSpec, TrainStream, build_eval_loader
from mmcl.data.captions import caption_inputs, check_captions_config
from mmcl.errors import ConfigError

from conftest import tiny_overrides

WIDTH = 40


def as_codes(text):
    """A caption as a fixed-width row of its character codes (0-padded), so a batch can be read back."""
    codes = [ord(c) for c in text][:WIDTH]
    return torch.tensor(codes + [0] * (WIDTH - len(codes)))


def as_text(row):
    return "".join(chr(c) for c in row.tolist() if c)


def caption_specs(captions, per_sample=1, fields=("json:captions", "txt"), placeholder=None):
    data = DataConfig(captions=captions, captions_per_sample=per_sample)
    inputs = {
        "image": InputSpec("image", ["png"], lambda image: torch.tensor(image.size)),
        "text": InputSpec("text", list(fields), as_codes, placeholder),
    }
    return caption_inputs(data, inputs)


# Key -> (field, bytes): captions one per line, or a JSON list under "captions"; five are unusable.
SAMPLES = {
    "s0": ("txt", b"a 0\nb 0\nc 0\nd 0\n"),
    "s1": ("txt", b"only one\n"),
    "s2": ("txt", b"\n  \n"),  # blank lines only
    "s3": ("json", json.dumps({"captions": ["x 3", "", "y 3"]}).encode()),  # an empty string is no caption
    "s4": ("json", json.dumps({"captions": []}).encode()),  # an empty list
    "s5": ("json", json.dumps({"captions": "one string 5"}).encode()),  # a string: its lines
    "s6": ("json", json.dumps({"captions": ["fine", 6]}).encode()),  # not a list of strings
    "s7": ("json", json.dumps({"caption": "no list"}).encode()),  # no key "captions"
    "s8": ("txt", b"\xff\xfe bad"),  # not UTF-8
    "s9": ("json", json.dumps({"captions": ["p 9", "q 9", "r 9", "s 9"]}).encode()),
}


def write_samples(out, digit_pngs):
    with ShardSetWriter(out, 4) as writer:
        for i, (key, (field, data)) in enumerate(SAMPLES.items()):
            writer.write({"__key__": key, "png": digit_pngs[i][0], field: data})
    return brace_pattern(out, len(writer.sizes))


def test_all_captions_make_k_rows_per_sample(tmp_path, digit_pngs):
    urls = write_samples(tmp_path, digit_pngs)
    batches = list(build_eval_loader(urls, caption_specs("all", per_sample=3), batch_size=3))
    assert sum(b.skipped for b in batches) == 5  # blank, empty list, not strings, no key, not UTF-8
    assert [k.split("#")[1] for b in batches for k in b.keys] == ["s0", "s1", "s3", "s5", "s9"]
    assert batches[0].inputs["text"].shape == (3, 3, WIDTH) and batches[0].inputs["image"].shape == (3, 2)
    read = [[as_text(row) for row in sample] for b in batches for sample in b.inputs["text"]]
    assert read == [
        ["a 0", "b 0", "c 0"],  # the first K
        ["only one"] * 3,  # fewer: repeated in order up to K
        ["x 3", "y 3", "x 3"],
        ["one string 5"] * 3,
        ["p 9", "q 9", "r 9"],
    ]


def test_text_reads_the_field_whole_as_before(tmp_path, digit_pngs):
    urls = write_samples(tmp_path, digit_pngs)
    batches = list(build_eval_loader(urls, caption_specs("text", fields=("txt",)), batch_size=10))
    assert [as_text(row) for row in batches[0].inputs["text"]] == ["a 0\nb 0\nc 0\nd 0", "only one"]
    json_list = list(build_eval_loader(urls, caption_specs("text", fields=("json:captions",)), batch_size=10))
    assert [as_text(row) for row in json_list[0].inputs["text"]] == ["one string 5"]  # a list is refused


def drawn(stream, batches):
    it = iter(stream)
    return [[as_text(row) for row in next(it).inputs["text"]] for _ in range(batches)]


def write_many_captions(out, digit_pngs):
    """Eight samples of ten captions each: a draw shows which one was taken."""
    with ShardSetWriter(out, 8) as writer:
        for i in range(8):
            text = "\n".join(f"caption {k} of {i}" for k in range(10))
            writer.write({"__key__": f"s{i}", "png": digit_pngs[i][0], "txt": text})
    return brace_pattern(out, len(writer.sizes))


@pytest.mark.parametrize("workers", [0, 1])  # in process (the RNG swapped in and out), or a seeded worker
def test_one_caption_is_drawn_per_read_and_a_resumed_stream_draws_alike(tmp_path, digit_pngs, workers):
    urls = write_many_captions(tmp_path, digit_pngs)
    specs = caption_specs("one", fields=("txt",))

    def stream(start=(0, 0), seed=0):
        return TrainStream(urls, specs, batch_size=4, workers=workers, shuffle_buffer=0, seed=seed, start=start)

    run = drawn(stream(), 6)  # three epochs of two batches, the samples in shard order each epoch
    assert all(t.endswith(f"of {i % 4 + 4 * (b % 2)}") for b, batch in enumerate(run) for i, t in enumerate(batch))
    epochs = [run[0] + run[1], run[2] + run[3], run[4] + run[5]]
    assert len({tuple(e) for e in epochs}) == 3  # each read of a sample draws anew
    assert len({t.split()[1] for e in epochs for t in e}) > 5  # from all of its captions
    assert drawn(stream(start=(1, 1)), 3) == run[3:]  # resumed mid-epoch: the very same draws
    assert drawn(stream(), 6) == run and drawn(stream(seed=1), 6) != run


def test_a_sample_lacking_an_optional_modality_repeats_its_placeholder_k_times(tmp_path, digit_pngs):
    with ShardSetWriter(tmp_path, 4) as writer:
        writer.write({"__key__": "with", "png": digit_pngs[0][0], "txt": b"a\nb", "title.txt": b"t"})
        writer.write({"__key__": "without", "png": digit_pngs[1][0], "title.txt": b"u"})
    placeholder = torch.full((WIDTH,), 7)
    specs = caption_specs("all", per_sample=2, fields=("txt",), placeholder=placeholder)
    specs["title"] = replace(specs["text"], fields=["title.txt"], placeholder=None)  # a second text tower
    (batch,) = build_eval_loader(brace_pattern(tmp_path, 1), specs, batch_size=2)
    assert batch.inputs["text"].shape == (2, 2, WIDTH) and batch.present["text"].tolist() == [True, False]
    assert torch.equal(batch.inputs["text"][1], placeholder.expand(2, WIDTH))
    assert [[as_text(row) for row in sample] for sample in batch.inputs["title"]] == [["t", "t"], ["u", "u"]]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"data.captions": "some"}, "data.captions"),
        ({"data.captions_per_sample": 0}, "data.captions_per_sample"),
    ],
)
def test_bad_caption_values_fail_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(None, tiny_overrides("unused.tar", **settings))


def test_captions_need_a_text_tower_and_k_needs_all():
    with pytest.raises(ConfigError, match="'data.captions'.*no fed tower reads text"):
        check_captions_config(DataConfig(captions="one"), {"image": "image", "audio": "audio"})
    with pytest.raises(ConfigError, match="'data.captions_per_sample'"):
        check_captions_config(DataConfig(captions="one", captions_per_sample=3), {"text": "text"})
    check_captions_config(DataConfig(captions="all", captions_per_sample=3), {"text": "text"})
