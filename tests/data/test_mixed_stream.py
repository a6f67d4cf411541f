"""The mixed stream: sources drawn by weight, shards drawn with replacement (resampled), per-source fields
and modalities, and an exact resume from any position."""

import json
import random
from collections import Counter

import pytest
import torch

from data_prep.writer import ShardSetWriter, brace_pattern
from mmcl.config import DataConfig, SourceConfig
from mmcl.data import InputSpec, TrainStream, expand_urls
from mmcl.data.sources import (
    MIX_BLOCK,
    Mixing,
    Slot,
    Source,
    build_mixing,
    source_samples,
    source_sequence,
    training_sources,
)
from mmcl.errors import DataError


def image_size(image):
    return torch.tensor(image.size)


def text_length(text):
    return torch.tensor([len(text)])


INPUTS = {"image": InputSpec("image", ["png"], image_size), "text": InputSpec("text", ["txt"], text_length)}
FIELDS = {"image": ["png"], "text": ["txt"]}


def write_source(root, name, digit_pngs, shards, per_shard, extra=None):
    """`shards` shards of `per_shard` samples (real handwritten digits); keys name the source."""
    with ShardSetWriter(root / name, per_shard) as writer:
        for i in range(shards * per_shard):
            png, label = digit_pngs[i % len(digit_pngs)]
            writer.write({"__key__": f"{name}{i:04d}", "png": png, "txt": f"digit {label}", **(extra or {})})
    return expand_urls(brace_pattern(root / name, shards))


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory, digit_pngs):
    root = tmp_path_factory.mktemp("sources")
    sizes = {"a": (2, 10), "b": (3, 20), "c": (8, 25)}  # sizes unlike the weights: 20, 60 and 200 samples
    return [write_source(root, name, digit_pngs, *size) for name, size in sizes.items()]


def draw(stream, samples):
    """The (source, key) of the first `samples` samples of the stream."""
    drawn = []
    for batch in stream:
        drawn += list(zip(batch.sources, batch.keys, strict=True))
        if len(drawn) >= samples:
            return drawn[:samples]


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_each_source_share_is_within_one_percent_of_its_weight(three_sources, resampled, workers):
    weights = [0.2, 0.3, 0.5]
    sources = [Source(shards, w, FIELDS) for shards, w in zip(three_sources, weights, strict=True)]
    mixing = Mixing(sources, resampled, epoch_samples=1000)  # 5,000 samples: five epochs
    drawn = draw(TrainStream("", INPUTS, 50, workers, 20, seed=3, mixing=mixing), 5000)
    shares = Counter(source for source, _ in drawn)
    for index, weight in enumerate(weights):
        assert abs(shares[index] / 5000 - weight) <= 0.01, (index, shares)
    for source, key in drawn:  # each sample is from the source it says
        assert key.split("#")[1].startswith("abc"[source])


def test_source_sequence_is_exact_in_expectation_and_within_one_per_block():
    weights = [0.013, 0.33, 1.0, 0.2]  # shares 0.83%, 21.2%, 64.2%, 12.8% of each block of 100
    expected = [MIX_BLOCK * w / sum(weights) for w in weights]
    sequence = source_sequence(weights, random.Random(0))
    totals = Counter()
    for _ in range(2000):
        block = Counter(next(sequence) for _ in range(MIX_BLOCK))
        for index, share in enumerate(expected):
            assert int(share) <= block[index] <= int(share) + 1, (index, block)
        totals.update(block)
    for index, share in enumerate(expected):  # the rounding is unbiased: 2,000 blocks average to the share
        assert abs(totals[index] / 2000 - share) < 0.03, (index, totals[index] / 2000, share)


def test_resampled_draws_shards_with_replacement_and_epochs_read_every_sample_once(three_sources):
    source = [Source(three_sources[2], 1.0, FIELDS)]  # 8 shards of 25 samples
    once = draw(TrainStream("", INPUTS, 25, 0, 0, seed=0, mixing=Mixing(source, False, 200)), 200)
    assert len({key for _, key in once}) == 200  # a pass reads every sample once
    shards = [[key.split("#")[0] for _, key in draw(
        TrainStream("", INPUTS, 25, 0, 0, seed=seed, mixing=Mixing(source, True, 200)), 200)][::25]
        for seed in range(5)]  # fmt: skip
    assert any(len(set(drawn)) < 8 for drawn in shards)  # some shard drawn twice in 8 draws
    assert set().union(*shards) == set(three_sources[2])  # yet every shard is drawn


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_any_position_continues_the_same_samples(three_sources, resampled, workers):
    sources = [Source(shards, w, FIELDS) for shards, w in zip(three_sources, [1.0, 2.0, 2.0], strict=True)]
    mixing = Mixing(sources, resampled, epoch_samples=120)  # 6 batches an epoch
    whole = TrainStream("", INPUTS, 20, workers, 10, seed=1, mixing=mixing)
    batches, stream = [], iter(whole)
    for _ in range(14):
        position = whole.position  # where a checkpoint taken now would resume: at the next batch
        batches.append((position, next(stream)))
    assert [position for position, _ in batches[5:8]] == [(0, 5), (1, 0), (1, 1)] and whole.position == (2, 2)
    for position, batch in [batches[3], batches[6], batches[11], batches[12]]:  # mid-epoch, at a boundary, later
        resumed = next(iter(TrainStream("", INPUTS, 20, workers, 10, seed=1, start=position, mixing=mixing)))
        assert resumed.keys == batch.keys and resumed.sources == batch.sources
        assert all(torch.equal(resumed.inputs[m], batch.inputs[m]) for m in INPUTS)
    other_seed = TrainStream("", INPUTS, 20, workers, 10, seed=2, mixing=mixing)
    assert next(iter(other_seed)).keys != batches[0][1].keys


def test_a_source_reads_its_own_fields_and_lacks_what_it_does_not_hold(tmp_path, digit_pngs):
    """An image-text source beside a source of captioned titles whose captions sit in a json key: the
    title source holds no image, so its samples' images are placeholders, marked absent."""
    image_text = write_source(tmp_path, "pic", digit_pngs, 2, 10)
    caption = json.dumps({"caption": "a title caption"})
    titled = write_source(tmp_path, "ttl", digit_pngs, 2, 10, extra={"json": caption, "caption": "a title"})
    inputs = {
        "image": InputSpec("image", ["png"], image_size, placeholder=torch.zeros(2, dtype=torch.long)),
        "title": InputSpec("text", ["caption"], text_length, placeholder=torch.zeros(1, dtype=torch.long)),
        "text": InputSpec("text", ["txt"], text_length),
    }
    sources = [Source(image_text, 1.0, {"image": ["png"], "text": ["txt"]}),
               Source(titled, 1.0, {"title": ["caption"], "text": ["json:caption"]})]  # fmt: skip
    batch = next(iter(TrainStream("", inputs, 40, 0, 0, seed=0, mixing=Mixing(sources, False, 40))))
    titled_rows = torch.tensor(batch.sources) == 1
    assert titled_rows.sum() == 20
    assert torch.equal(batch.present["image"], ~titled_rows) and torch.equal(batch.present["title"], titled_rows)
    assert (batch.inputs["image"][titled_rows] == 0).all() and (batch.inputs["image"][~titled_rows] == 8).all()
    assert (batch.inputs["text"][titled_rows] == len("a title caption")).all()  # the json key, not txt
    assert (batch.inputs["text"][~titled_rows] == len("digit 0")).all()


def test_data_train_sources_and_resampling_from_the_config(three_sources):
    train = "::".join(brace_pattern(s[0].rsplit("/", 1)[0], len(s)) for s in three_sources)
    plain = DataConfig(train=train)
    sources = training_sources(plain, ["image", "text"])
    assert [s.shards for s in sources] == three_sources and build_mixing(plain, sources) is None
    resampled = build_mixing(DataConfig(train=train, resampled=True), sources)
    assert resampled is not None and resampled.epoch_samples == 280  # what sizes.json lists
    assert [s.weight for s in resampled.sources] == [2, 3, 8]  # by shard count: shards drawn uniformly
    for source, key in draw(TrainStream("", INPUTS, 20, 0, 10, seed=0, mixing=resampled), 300):
        assert key.split("#")[1].startswith("abc"[source])  # each sample counted for its own part
    weighted = DataConfig(sources=[SourceConfig(urls=train.split("::")[0], weight=2.0, modalities=["image", "text"],
                                                fields={"text": "json:caption"})], epoch_samples=64)  # fmt: skip
    mixing = build_mixing(weighted, training_sources(weighted, ["image", "text"]))
    assert mixing == Mixing([Source(three_sources[0], 2.0, {"image": ["jpg", "jpeg", "png", "webp"],
                                                            "text": ["json:caption"]})], False, 64)  # fmt: skip


def first(samples, n):
    return [sample["__key__"] for _, sample in zip(range(n), samples, strict=False)]


def tar_error(error):
    return True  # skip, as the stream's handler does


def test_readers_split_a_source_of_fewer_shards_than_readers_by_sample(three_sources):
    source = Source(three_sources[0], 1.0, FIELDS)  # 2 shards of 10 samples, 4 readers: 5 samples each a pass
    passes = [first(source_samples(0, source, False, 0, 0, Slot(i, 4), tar_error), 5) for i in range(4)]
    assert sorted(sum(passes, [])) == sorted(f"a{i:04d}" for i in range(20))  # each sample once, in one reader


def test_a_bad_shard_is_skipped_and_a_source_of_bad_shards_stops_the_run(tmp_path, three_sources):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file" * 100)
    mostly_good = Source([*three_sources[1], str(garbage)], 1.0, FIELDS)  # 4 shards, 4 readers: 1 a pass
    for slot in range(4):  # every reader meets the bad shard alone in some pass, and goes on
        assert len(first(source_samples(0, mostly_good, False, 0, 0, Slot(slot, 4), tar_error), 100)) == 100
    with pytest.raises(DataError, match=r"training source 1 .*none of its 2 shards"):
        first(source_samples(1, Source([str(garbage)] * 2, 1.0, FIELDS), True, 0, 0, Slot(0, 1), tar_error), 1)


def test_a_source_read_through_a_field_it_lacks_stops_the_run_naming_it(three_sources):
    lacking = Source(three_sources[1], 1.0, {"image": ["png"], "text": ["json:caption"]})  # no json field
    mixing = Mixing([Source(three_sources[0], 1.0, FIELDS), lacking], False, 1000)
    with pytest.raises(DataError, match=r"training source 1: its last 1000 samples were all unreadable"):
        draw(TrainStream("", INPUTS, 20, 0, 10, seed=0, mixing=mixing), 5000)


def test_a_finished_epoch_resumes_at_the_next_one(three_sources):
    stream = TrainStream(
        "", INPUTS, 20, 0, 10, seed=0, mixing=Mixing([Source(three_sources[2], 1.0, FIELDS)], False, 60)
    )
    batches = iter(stream)
    positions = [(next(batches), stream.position)[1] for _ in range(4)]
    assert positions == [(0, 1), (0, 2), (1, 0), (1, 1)]  # nothing of epoch 0 is replayed after its last batch
