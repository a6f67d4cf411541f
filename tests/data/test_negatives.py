"""Hard negatives from the shards: a text field with one negative caption per line -> (B, H, ...)."""

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl.config import DataConfig, SourceConfig
from mmcl.data import InputSpec, TrainStream, build_eval_loader
from mmcl.data.negatives import check_negatives_config, negative_inputs
from mmcl.errors import ConfigError

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
    return {**inputs, **negative_inputs(data, {"text": preprocess})}


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


@pytest.mark.parametrize(
    "settings, kinds, message",
    [
        ({"negatives": {"audio": "neg.txt"}}, {"image": "image", "text": "text"}, "data.negatives.audio"),
        ({"negatives": {"image": "neg.txt"}}, {"image": "image", "text": "text"}, "data.negatives.image"),
        ({"negatives": {"text": "neg.png"}}, {"image": "image", "text": "text"}, "data.negatives.text"),
        ({"negatives": {"text": ";"}}, {"image": "image", "text": "text"}, "data.negatives.text"),
        (
            {"negatives": {"text": "neg.txt"}, "optional_modalities": ["text"]},
            {"image": "image", "text": "text"},
            "optional",
        ),
        (
            {"negatives": {"text": "neg.txt"}, "sources": [SourceConfig(urls="a.tar")]},
            {"text": "text"},
            "data.negatives",
        ),
    ],
)
def test_negatives_the_towers_cannot_read_fail_naming_the_key(settings, kinds, message):
    with pytest.raises(ConfigError, match=message):
        check_negatives_config(DataConfig(**settings), kinds)
