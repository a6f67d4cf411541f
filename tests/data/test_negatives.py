"""Hard negatives from the shards -> (B, H, ...): a text field with one negative caption per line, or
image (audio) fields, numbered for several ("neg.0.png", "neg.1.png", ...)."""

import io

import numpy as np
import pytest
import soundfile
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl.config import DataConfig, SourceConfig
from mmcl.data import InputSpec, TrainStream, build_eval_loader
from mmcl.data.decode import decode_image
from mmcl.data.negatives import check_negatives_config, negative_inputs
from mmcl.errors import ConfigError

from conftest import tiny_model

WIDTH = 40


def as_codes(text):
    """A caption as a fixed-width row of its character codes (0-padded), so a batch can be read back."""
    codes = [ord(c) for c in text][:WIDTH]
    return torch.tensor(codes + [0] * (WIDTH - len(codes)))


def as_text(row):
    return "".join(chr(c) for c in row.tolist() if c)


def inputs_with_negatives(per_sample, preprocess=as_codes):
    data = DataConfig(negatives={"text": "neg.txt"}, negatives_per_sample=per_sample)
    inputs = {
        "image": InputSpec("image", ["png"], lambda image: torch.tensor(image.size)),
        "text": InputSpec("text", ["txt"], preprocess),
    }
    return {**inputs, **negative_inputs(data, {"text": preprocess}, {"text": "text"})}


def write_samples(out, digit_pngs):
    """Ten samples; three of them unusable for negatives: a missing field, blank lines only, not UTF-8."""
    negatives = {
        0: b"a 1\na 2\na 3\na 4\n",
        1: b"only one\n",
        2: None,
        3: b"\n  \n",
        4: b"\xff\xfe bad",
        5: b"x five\n\ny five\n",
    }
    with ShardSetWriter(out, 4) as writer:
        for i, (png, _) in enumerate(digit_pngs[:10]):
            sample = {"__key__": f"s{i}", "png": png, "txt": f"caption {i}"}
            neg = negatives.get(i, f"not {i}\nnor {i}\nneither {i}".encode())
            if neg is not None:
                sample["neg.txt"] = neg
            writer.write(sample)
    return brace_pattern(out, len(writer.sizes))


def test_negative_captions_reach_the_batch_h_per_sample(tmp_path, digit_pngs):
    urls = write_samples(tmp_path, digit_pngs)
    batches = list(build_eval_loader(urls, inputs_with_negatives(per_sample=3), batch_size=4))
    assert sum(b.skipped for b in batches) == 3  # missing, blank, not UTF-8: skipped and counted
    keys = [k.split("#")[1] for b in batches for k in b.keys]
    assert keys == ["s0", "s1", "s5", "s6", "s7", "s8", "s9"]
    negatives = torch.cat([b.negatives["text"] for b in batches])  # (7, 3, WIDTH)
    assert negatives.shape == (7, 3, WIDTH) and set(batches[0].negatives) == {"text"}
    assert "text.negatives" not in batches[0].inputs and set(batches[0].inputs) == {"image", "text"}
    read = [[as_text(row) for row in sample] for sample in negatives]
    assert read[0] == ["a 1", "a 2", "a 3"]  # the first H lines
    assert read[1] == ["only one"] * 3  # fewer: repeated in order up to H
    assert read[2] == ["x five", "y five", "x five"]  # blank lines are not negatives
    assert read[3] == ["not 6", "nor 6", "neither 6"]
    positives = [as_text(row) for b in batches for row in b.inputs["text"]]
    assert positives == [f"caption {i}" for i in (0, 1, 5, 6, 7, 8, 9)]


def test_train_stream_tokenises_negatives_with_the_text_preprocessing(tmp_path, digit_pngs):
    urls = write_samples(tmp_path, digit_pngs)
    tokenizer = SimpleTokenizer(context_length=16)  # what the open_clip text tower's preprocessing does

    def tokenize(text):
        return tokenizer([text])[0]

    stream = TrainStream(urls, inputs_with_negatives(2, tokenize), batch_size=7, workers=0, shuffle_buffer=0, seed=0)
    batch = next(iter(stream))
    assert batch.skipped == 3 and batch.negatives["text"].shape == (7, 2, 16)
    expected = torch.stack([tokenizer(["a 1", "a 2"]), tokenizer(["only one", "only one"])])  # (2, 2, 16)
    assert torch.equal(batch.negatives["text"][:2], expected)


def test_weighted_sources_each_read_their_samples_negatives(tmp_path, digit_pngs):
    """data.sources: each source's samples read through the source's own caption field, and their
    negatives through data.negatives, whichever source a batch row was drawn from."""
    from mmcl.data.sources import Mixing, Source

    for name in ("a", "b"):
        with ShardSetWriter(tmp_path / name, 5) as writer:
            for i, (png, _) in enumerate(digit_pngs[:10]):
                caption = {"txt": f"{name} caption {i}"} if name == "a" else {"caption": f"{name} caption {i}"}
                negatives = f"{name} not {i}\n{name} nor {i}"
                writer.write({"__key__": f"{name}{i}", "png": png, **caption, "neg.txt": negatives})
    sources = [
        Source(sorted(map(str, (tmp_path / "a").glob("*.tar"))), 1.0, {"image": ["png"], "text": ["txt"]}),
        Source(sorted(map(str, (tmp_path / "b").glob("*.tar"))), 3.0, {"image": ["png"], "text": ["caption"]}),
    ]
    stream = TrainStream("", inputs_with_negatives(2), 20, 0, 0, seed=0, mixing=Mixing(sources, False, 20))
    batch = next(iter(stream))
    assert batch.negatives["text"].shape == (20, 2, WIDTH) and sorted(set(batch.sources)) == [0, 1]
    for key, caption, negatives in zip(batch.keys, batch.inputs["text"], batch.negatives["text"], strict=True):
        name, i = key.split("#")[1][0], key.split("#")[1][1:]
        assert as_text(caption) == f"{name} caption {i}"
        assert [as_text(row) for row in negatives] == [f"{name} not {i}", f"{name} nor {i}"]


@pytest.mark.parametrize(
    "settings, kinds, message",
    [
        ({"negatives": {"audio": "neg.txt"}}, {"image": "image", "text": "text"}, "data.negatives.audio"),
        ({"negatives": {"image": "neg.txt"}}, {"image": "image", "text": "text"}, "data.negatives.image.*image"),
        ({"negatives": {"audio": "neg.png"}}, {"audio": "audio", "text": "text"}, "data.negatives.audio.*audio"),
        (
            {"negatives": {"image": "neg.png"}, "optional_modalities": ["image"]},
            {"image": "image", "text": "text"},
            "data.negatives.image.*optional",
        ),
        ({"negatives": {"text": "neg.png"}}, {"image": "image", "text": "text"}, "data.negatives.text"),
        ({"negatives": {"text": ";"}}, {"image": "image", "text": "text"}, "data.negatives.text"),
        (
            {"negatives": {"text": "neg.txt"}, "optional_modalities": ["text"]},
            {"image": "image", "text": "text"},
            "optional",
        ),
        (
            {
                "negatives": {"text": "neg.txt"},
                "sources": [SourceConfig(urls="a.tar"), SourceConfig(urls="b.tar", modalities=["image", "audio"])],
            },
            {"image": "image", "text": "text", "audio": "audio"},
            r"data.sources\[1\].modalities.*'text'.*data.negatives.text",
        ),
    ],
)
def test_negatives_the_towers_cannot_read_fail_naming_the_key(settings, kinds, message):
    with pytest.raises(ConfigError, match=message):
        check_negatives_config(DataConfig(**settings), kinds)


def jpeg(png):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def write_image_negatives(out, digit_pngs):
    """Nine digits, each with negative images that are other digits (d[i]: the i-th digit's PNG), under
    the fields data.negatives.image "neg.jpg;neg.png" reads; three samples unusable. -> the negatives
    each kept sample must yield with H = 2, as PNG/JPEG bytes."""
    d = [png for png, _ in digit_pngs]
    negatives = {
        0: {"neg.0.png": d[10], "neg.1.png": d[11], "neg.2.png": d[12]},  # the first H of three
        1: {"neg.png": d[13]},  # the unnumbered field: one negative, repeated
        2: {},  # none: skipped
        3: {"neg.0.png": b"\x89PNG corrupt", "neg.1.png": d[14]},  # a corrupt one: skipped
        4: {"neg.1.png": d[15]},  # the numbered fields present, in index order
        5: {"neg.0.png": d[16], "neg.png": d[17]},  # numbered fields first
        6: {"neg.png": d[18], "neg.0.jpg": jpeg(d[19]), "neg.1.jpg": jpeg(d[20])},  # the first alternative
        7: {"neg.1.png": d[21], "neg.0.png": d[22]},
        8: {"neg.txt": b"not an image"},  # no image field: skipped
    }
    expected = {0: [d[10], d[11]], 1: [d[13]] * 2, 4: [d[15]] * 2, 5: [d[16]] * 2}
    expected.update({6: [jpeg(d[19]), jpeg(d[20])], 7: [d[22], d[21]]})
    with ShardSetWriter(out, 4) as writer:
        for i, fields in negatives.items():
            writer.write({"__key__": f"s{i}", "png": d[i], "txt": f"caption {i}", **fields})
    return brace_pattern(out, len(writer.sizes)), expected


def test_negative_images_reach_the_batch_preprocessed_by_the_tower(tmp_path, digit_pngs):
    urls, expected = write_image_negatives(tmp_path, digit_pngs)
    preprocess = tiny_model().preprocessors(train=False)  # the image tower's: (3, 32, 32) per image
    data = DataConfig(negatives={"image": "neg.jpg;neg.png"}, negatives_per_sample=2)
    inputs = {
        "image": InputSpec("image", ["png"], preprocess["image"]),
        "text": InputSpec("text", ["txt"], preprocess["text"]),
        **negative_inputs(data, preprocess, {"image": "image", "text": "text"}),
    }
    batches = list(build_eval_loader(urls, inputs, batch_size=4))
    assert sum(b.skipped for b in batches) == 3  # none, a corrupt one, a text field only
    assert [k.split("#")[1] for b in batches for k in b.keys] == ["s0", "s1", "s4", "s5", "s6", "s7"]
    assert set(batches[0].negatives) == {"image"} and set(batches[0].inputs) == {"image", "text"}
    negatives = torch.cat([b.negatives["image"] for b in batches])
    assert negatives.shape == (6, 2, 3, 32, 32)
    for row, i in zip(negatives, expected, strict=True):
        want = torch.stack([preprocess["image"](decode_image(image)) for image in expected[i]])  # (2, 3, 32, 32)
        assert torch.equal(row, want), f"sample s{i}"
    positives = torch.cat([b.inputs["image"] for b in batches])  # the positives are untouched
    assert torch.equal(positives[0], preprocess["image"](decode_image(digit_pngs[0][0])))


def wav(value):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full(80, value, dtype=np.float32), 8000, format="WAV")
    return buffer.getvalue()


def test_negative_clips_read_by_the_same_rule(tmp_path, digit_pngs):
    with ShardSetWriter(tmp_path, 8) as writer:
        writer.write({"__key__": "a", "png": digit_pngs[0][0], "neg.0.wav": wav(0.25), "neg.2.wav": wav(0.5)})
        writer.write({"__key__": "b", "png": digit_pngs[1][0], "neg.wav": wav(-0.25)})
        writer.write({"__key__": "c", "png": digit_pngs[2][0], "neg.0.wav": b"RIFF broken"})
    data = DataConfig(negatives={"audio": "neg.wav"}, negatives_per_sample=3)
    level = {"audio": lambda clip: torch.tensor([clip[0].mean(), clip[1]])}  # (mean sample, sample rate)
    inputs = {
        "image": InputSpec("image", ["png"], lambda image: torch.tensor(image.size)),
        **negative_inputs(data, level, {"audio": "audio"}),
    }
    (batch,) = build_eval_loader(brace_pattern(tmp_path, 1), inputs, batch_size=4)
    assert batch.skipped == 1 and batch.negatives["audio"].shape == (2, 3, 2)
    expected = torch.tensor([[[0.25, 8000], [0.5, 8000], [0.25, 8000]], [[-0.25, 8000]] * 3])
    torch.testing.assert_close(batch.negatives["audio"], expected.to(batch.negatives["audio"].dtype))


def test_negatives_of_every_tower_kind_pass_the_check():
    kinds = {"image": "image", "text": "text", "audio": "audio"}
    fields = {"image": "neg.jpg;neg.png", "text": "neg.txt", "audio": "neg.flac;neg.wav"}
    check_negatives_config(DataConfig(negatives=fields), kinds)
