"""Raw shard bytes -> Python values, by an explicit allow-list of formats.

Only images (Pillow), audio (libsndfile, through soundfile), UTF-8 text and integer labels are ever
decoded. Fields with any other extension, pickles among them (.pyd, .pickle, .pth), are never touched,
so nothing from a shard is unpickled.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import soundfile
from PIL import Image

from mmcl.errors import DataError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff"})
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "opus", "mp3"})
TEXT_EXTENSIONS = frozenset({"txt", "text", "caption", "json", "cls", "label"})


class SampleError(ValueError):
    """A sample that cannot be used: it is skipped and counted, never fatal."""


def decode_image(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its pixel limit; treat every decompression bomb as bad data.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise SampleError(f"unreadable image: {error}") from None


# Longer recordings are refused rather than decoded whole: the audio analogue of a decompression bomb.
MAX_SECONDS = 600.0

Waveform = Tuple[np.ndarray, int]  # (samples,) float32 mono, sample rate


def decode_audio(data: bytes) -> Waveform:
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio:
            if audio.frames > MAX_SECONDS * audio.samplerate:
                raise SampleError(f"audio is {audio.frames / audio.samplerate:.0f} s long, over {MAX_SECONDS:.0f} s")
            samples = audio.read(dtype="float32", always_2d=True)  # (frames, channels)
            rate = audio.samplerate
    except SampleError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise SampleError(f"unreadable audio: {error}") from None
    if samples.shape[0] == 0:
        raise SampleError("empty audio")
    if not np.isfinite(samples).all():
        raise SampleError("audio holds NaN/Inf samples")
    return samples.mean(axis=1), rate  # down-mix to mono


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleError("text is not UTF-8") from None
    if not text:
        raise SampleError("empty text")
    return text


def caption_lines(text: str) -> List[str]:
    """The captions of a text holding one per line (CLIP_benchmark's retrieval layout); blank lines are none."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def decode_captions(data: bytes) -> List[str]:
    """A text field holding several captions of one sample, one per line: at least one, or SampleError."""
    captions = caption_lines(decode_text(data))
    if not captions:
        raise SampleError("no caption (every line is blank)")
    return captions


def decode_label(data: bytes) -> int:
    text = decode_text(data)
    try:
        return int(text)
    except ValueError:
        raise SampleError(f"label {text[:20]!r} is not an integer") from None


DECODERS: Dict[str, Tuple[frozenset, Callable[[bytes], object]]] = {
    "image": (IMAGE_EXTENSIONS, decode_image),
    "audio": (AUDIO_EXTENSIONS, decode_audio),
    "text": (TEXT_EXTENSIONS, decode_text),
    "label": (TEXT_EXTENSIONS, decode_label),
    "captions": (TEXT_EXTENSIONS, decode_captions),  # a list of strings: one per line, or a JSON list
}


def shard_field(name: str) -> str:
    """The shard field a configured field reads: "json" for "json:caption", else the name itself."""
    return name.partition(":")[0]


def check_fields(kind: str, fields: Sequence[str]) -> None:
    """Fail early when a configured shard field could never be decoded as `kind`. A field may name a key
    of a JSON field ("json:caption", as img2dataset writes its metadata)."""
    allowed, _ = DECODERS[kind]
    for name in fields:
        field, _, key = name.partition(":")
        if key and field.rsplit(".", 1)[-1] != "json":
            raise DataError(f"field {name!r}: only a json field has keys (e.g. json:caption)")
        if field.rsplit(".", 1)[-1] not in allowed:
            raise DataError(f"field {name!r} cannot hold {kind} data; allowed extensions: {', '.join(sorted(allowed))}")


def _json_value(data: bytes, key: str) -> bytes:
    """The string (or number) under `key` of a JSON object, as UTF-8 bytes. JSON only: nothing is unpickled."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SampleError("json field is not valid JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get(key), (str, int)):
        raise SampleError(f"json field has no text or number under {key!r}")
    return str(value[key]).encode()


def _json_captions(data: bytes, key: str) -> List[str]:
    """The captions under `key` of a JSON object: a list of strings (COCO-style metadata), or one string
    holding them one per line. An empty list, or one holding anything but strings, is SampleError."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SampleError("json field is not valid JSON") from None
    captions = value.get(key) if isinstance(value, dict) else None
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SampleError(f"json field has no caption list (a list of strings) under {key!r}")
    lines = [line for c in captions for line in caption_lines(c)]
    if not lines:
        raise SampleError(f"json field's caption list under {key!r} is empty")
    return lines


def decode_field(sample: Mapping[str, object], kind: str, fields: Sequence[str]) -> object:
    """Decode the first of `fields` present in `sample` as `kind`; SampleError if none is usable."""
    _, decoder = DECODERS[kind]
    for name in fields:
        field, _, key = name.partition(":")
        data = sample.get(field)
        if data is not None and key and kind == "captions":
            return _json_captions(data, key)  # type: ignore[arg-type]
        if data is not None:
            return decoder(_json_value(data, key) if key else data)  # type: ignore[arg-type]
    raise SampleError(f"no {kind} field (looked for {', '.join(fields)})")


def numbered_field(name: str, index: int) -> str:
    """The `index`-th of a sample's several fields named `name`: the index before the extension
    ("neg.png", 1 -> "neg.1.png"). Webdataset splits a member's name at its first dot, so the field of
    "s0.neg.1.png" is "neg.1.png"."""
    stem, dot, extension = name.rpartition(".")
    return f"{stem}.{index}.{extension}" if dot else f"{index}.{name}"


def decode_numbered_fields(sample: Mapping[str, object], kind: str, fields: Sequence[str], count: int) -> List[object]:
    """The values of the first of `fields` the sample holds, decoded as `kind`: its numbered fields
    (index 0 to count - 1, those present in index order), or else the unnumbered field as one value.
    SampleError if none is present or any present one is unreadable."""
    _, decoder = DECODERS[kind]
    for name in fields:
        numbered = [sample.get(numbered_field(name, index)) for index in range(count)]
        present = [data for data in numbered if data is not None]
        if not present and sample.get(name) is not None:
            present = [sample[name]]  # the unnumbered field: a single value
        if present:
            return [decoder(data) for data in present]  # type: ignore[arg-type]
    raise SampleError(f"no {kind} field (looked for {', '.join(f'{n} and its numbered fields' for n in fields)})")
