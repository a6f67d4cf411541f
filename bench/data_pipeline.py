"""Samples/s of the streaming pipeline per loader worker, against a reference on the same shards.

- image: 224 px JPEG + caption -> decode, open_clip's training transform (random resized crop) for
  ViT-B/16, open_clip's tokenizer -> batches. Reference: open_clip's webdataset training pipeline,
  stage for stage as `open_clip_train.data.get_wds_dataset` builds it (its shard shuffle, filter,
  decode, rename, map, batching; needs pandas: `pip install pandas`), except that webdataset's own
  tar reader stands in for open_clip's `tarfile_to_samples_nothrow`, which fails on webdataset 1.0
  (KeyError 'fname').
- audio: 10 s speech (FLAC, 22.05 kHz) + caption -> decode, resample to 16 kHz, random 10 s crop,
  128-band log-mel (the `base` audio preset) -> batches. open_clip has no audio pipeline, so the
  reference is plain webdataset doing the same decode and features (`wds.WebDataset(...).map(...)`).

Shards are written first (real handwritten digits upscaled to 224 px; speech by espeak-ng). Each
pipeline runs one pass over the shards with the given workers, the first batch (worker start-up) not
timed; mmcl and the reference take turns, `--repeats` times, and the best pass of each counts.

    python bench/data_pipeline.py                       # 1 worker, batch 64
    python bench/data_pipeline.py --workers 2 --images 4000
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from data_prep.writer import ShardSetWriter, brace_pattern


def write_image_shards(out: Path, count: int, shards: int) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    with ShardSetWriter(out, -(-count // shards)) as writer:
        for i in range(count):
            pixels = digits.images[i % len(digits.images)] * (255 / 16)
            big = np.kron(pixels, np.ones((28, 28)))  # 8x8 -> 224x224
            rgb = np.clip(big[..., None] + rng.normal(0, 20, (224, 224, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
            writer.write(
                {
                    "__key__": f"img{i:06d}",
                    "jpg": buffer.getvalue(),
                    "txt": f"a handwritten {digits.target[i % len(digits.target)]}",
                }
            )
    return brace_pattern(out, len(writer.sizes))


def write_audio_shards(out: Path, count: int, shards: int) -> str:
    import soundfile

    from data_prep.spoken_digits import WORDS, Utterance, espeak_binary, synthesise

    binary = espeak_binary()
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(min(count, 40)):  # 40 distinct 10 s recordings, repeated under distinct keys
        words = [synthesise(Utterance(int(d), "en-us+m3", 150, 50), binary) for d in rng.integers(0, 10, 14)]
        speech = np.concatenate([soundfile.read(io.BytesIO(w), dtype="float32")[0] for w in words])[: 10 * 22050]
        buffer = io.BytesIO()
        soundfile.write(buffer, speech, 22050, format="FLAC")
        clips.append(buffer.getvalue())
    with ShardSetWriter(out, -(-count // shards)) as writer:
        for i in range(count):
            writer.write({"__key__": f"clip{i:06d}", "flac": clips[i % len(clips)], "txt": f"speech {WORDS[i % 10]}"})
    return brace_pattern(out, len(writer.sizes))


def timed(batches: Iterable, size: Callable[[object], int]) -> float:
    """Samples/s over every batch but the first."""
    iterator = iter(batches)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for batch in iterator:
        samples += size(batch)
    return samples / (time.perf_counter() - start)


def mmcl_batches(urls: str, inputs: dict, samples: int, batch: int, workers: int):
    from mmcl.data import TrainStream

    stream = TrainStream(urls, inputs, batch, workers, shuffle_buffer=1000, seed=0)
    # Each worker drops its last partial batch: stop before the epoch could run out.
    return islice(stream, samples // batch - workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import open_clip
    from open_clip.transform import image_transform

    from mmcl.data import InputSpec
    from mmcl.models.audio import AUDIO_PRESETS, AudioPreprocess, AudioSettings
    from mmcl.models.towers import _Tokenize

    work = Path(tempfile.mkdtemp(prefix="mmcl-bench-"))
    shards = max(4, 2 * args.workers)
    image_urls = write_image_shards(work / "images", args.images, shards)
    audio_urls = write_audio_shards(work / "audio", args.clips, shards)

    transform = image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    image_inputs = {"image": InputSpec("image", ["jpg"], transform), "text": InputSpec("text", ["txt"], _Tokenize(77))}
    settings = AudioSettings(**AUDIO_PRESETS["base"])
    preprocess = AudioPreprocess(settings, train=True)
    audio_inputs = {
        "audio": InputSpec("audio", ["flac"], preprocess),
        "text": InputSpec("text", ["txt"], _Tokenize(77)),
    }
    image_batches, audio_batches = args.images // args.batch - args.workers, args.clips // args.batch - args.workers
    passes = {
        "ours_image": lambda: timed(mmcl_batches(image_urls, image_inputs, args.images, args.batch, args.workers), len),
        "theirs_image": lambda: timed(
            islice(open_clip_loader(image_urls, transform, tokenizer, args.batch, args.workers), image_batches),
            lambda batch: len(batch[0]),
        ),
        "ours_audio": lambda: timed(mmcl_batches(audio_urls, audio_inputs, args.clips, args.batch, args.workers), len),
        "theirs_audio": lambda: timed(
            islice(plain_audio_loader(audio_urls, preprocess, args.batch, args.workers), audio_batches),
            lambda batch: len(batch[0]),
        ),
    }
    best: dict = {}
    for _ in range(args.repeats):
        for name, run in passes.items():
            best[name] = max(best.get(name, 0.0), run())
    ours_image, theirs_image, ours_audio, theirs_audio = (best[n] for n in passes)

    print(f"per worker, {args.workers} worker(s), batch {args.batch}, 1 thread per process")
    print(f"{'pipeline':<30}  {'mmcl samples/s':>14}  {'reference samples/s':>19}  {'ratio':>5}")
    for name, ours, theirs, ref in (
        ("224px JPEG + caption", ours_image, theirs_image, "open_clip"),
        ("10 s audio + caption", ours_audio, theirs_audio, "plain webdataset"),
    ):
        print(f"{name:<30}  {ours / args.workers:14.1f}  {theirs / args.workers:13.1f} ({ref})  {ours / theirs:5.2f}")


def open_clip_loader(urls: str, preprocess: Callable, tokenizer: Callable, batch: int, workers: int):
    """open_clip_train's webdataset training pipeline, stage for stage (see the module docstring)."""
    import random

    import webdataset as wds
    from open_clip_train.data import (
        _SAMPLE_SHUFFLE_INITIAL,
        _SAMPLE_SHUFFLE_SIZE,
        _SHARD_SHUFFLE_INITIAL,
        _SHARD_SHUFFLE_SIZE,
        SharedEpoch,
        detshuffle2,
        filter_no_caption_or_no_image,
        log_and_continue,
    )

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(braceexpand(urls))),
        detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=0, epoch=SharedEpoch(0)),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(bufsize=_SAMPLE_SHUFFLE_SIZE, initial=_SAMPLE_SHUFFLE_INITIAL, rng=random.Random(0)),
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def plain_audio_loader(urls: str, preprocess: Callable, batch: int, workers: int):
    """The same work as plain webdataset stages: shuffle, decode with soundfile, features, batch."""
    import webdataset as wds

    from mmcl.data.decode import decode_audio
    from mmcl.models.towers import _Tokenize

    tokenize = _Tokenize(77)
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
        .shuffle(1000)
        .map(lambda s: (preprocess(decode_audio(s["flac"])), tokenize(s["txt"].decode())))
        .batched(batch, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


if __name__ == "__main__":
    main()
