"""Shared fixtures: real data built by data_prep (scikit-learn's handwritten digits), tiny configs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits set written once per test session (2 captions per training image)."""
    from data_prep.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits", numbered=False)  # the dataset is named after its folder
    prepare_digits(root, captions_per_image=2, samples_per_shard=500, seed=0)
    return root


@pytest.fixture(scope="session")
def spoken_digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tri-modal set (digits written and spoken by espeak-ng), one clip per voice and digit."""
    from data_prep.spoken_digits import prepare_spoken_digits

    root = tmp_path_factory.mktemp("spoken_digits", numbered=False)
    prepare_spoken_digits(root, clips_per_voice=1, captions_per_image=1, samples_per_shard=500, seed=0)
    return root


@pytest.fixture(scope="session")
def digit_pngs() -> list:
    """A few real handwritten digits as PNG bytes, with their labels."""
    digits = load_digits()
    out = []
    for pixels, label in zip(digits.images[:40], digits.target[:40]):
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L").save(buffer, format="PNG")
        out.append((buffer.getvalue(), int(label)))
    return out


def tiny_overrides(train_urls: str, **extra: object) -> list:
    """CLI-style overrides for a tiny, fast, quiet run on the digits shards."""
    items = {
        "data.train": train_urls, "data.batch_size": 32, "data.workers": 0, "data.shuffle_buffer": 100,
        "run.progress": False, "run.log_every": 1, "model.embed_dim": 64,
        "model.towers.image.type": "open_clip_vision", "model.towers.image.preset": "mmcl-tiny",
        "model.towers.text.type": "open_clip_text", "model.towers.text.preset": "mmcl-tiny",
        "eval.datasets": "[]",  # configs/digits.yaml evaluates on data/digits, which tests do not build
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]
