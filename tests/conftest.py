"""Shared fixtures: real data built by data_prep (scikit-learn's handwritten digits), tiny configs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from mmcl import config as config_lib
from mmcl.cli import main
from mmcl.config import Config
from mmcl.models import MultiEncoder

torch.set_num_threads(2)

REPO = Path(__file__).parents[1]


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
    for pixels, label in zip(digits.images[:40], digits.target[:40], strict=False):
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L").save(buffer, format="PNG")
        out.append((buffer.getvalue(), int(label)))
    return out


def held_out_samples(root):
    """(key, png bytes, label) of every sample in a CLIP_benchmark-layout test split."""
    out = []
    for shard in sorted((root / "test").glob("*.tar")):
        fields = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                fields.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out += [(key, f["png"], int(f["cls"])) for key, f in fields.items()]
    return out


@pytest.fixture(scope="session")
def folder_root(digits_root, tmp_path_factory):
    """The digits test split again, as a plain folder per class (class names from the folder names)."""
    root = tmp_path_factory.mktemp("digit_folders")
    words = (digits_root / "classnames.txt").read_text().split()
    for key, png, label in held_out_samples(digits_root):
        folder = root / f"{label}_{words[label]}"  # sorts in label order; "3_three" reads "3 three"
        folder.mkdir(exist_ok=True)
        (folder / f"{key}.png").write_bytes(png)
    (root / "zeroshot_classification_templates.txt").write_text(
        (digits_root / "zeroshot_classification_templates.txt").read_text()
    )
    return root


def digits_run_overrides(digits_root: Path, out: Path) -> list:
    """The settings digits_run trains with (in run directory out/tiny)."""
    return tiny_overrides(
        f"{digits_root}/train/{{000000..000005}}.tar",
        **{
            "run.output_dir": out,
            "run.name": "tiny",
            "run.steps": 300,
            "run.checkpoint_every": 200,
            "run.keep_last": 1,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 10,
            "eval.datasets": f"[{digits_root}]",
        },
    )


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Path:
    """The tiny image-text model trained on the digits through the CLI (300 steps, then evaluated), as
    the end-to-end and agreement tests read it; a test that changes the run works on a copy."""
    out = tmp_path_factory.mktemp("runs")
    overrides = digits_run_overrides(digits_root, out)
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 0
    return out / "tiny"


def tiny_overrides(train_urls: str, **extra: object) -> list:
    """CLI-style overrides for a tiny, fast, quiet run on the digits shards."""
    items = {
        "data.train": train_urls,
        "data.batch_size": 32,
        "data.workers": 0,
        "data.shuffle_buffer": 100,
        "run.progress": False,
        "run.log_every": 1,
        "model.embed_dim": 64,
        "model.towers.image.type": "open_clip_vision",
        "model.towers.image.preset": "mmcl-tiny",
        "model.towers.text.type": "open_clip_text",
        "model.towers.text.preset": "mmcl-tiny",
        "eval.datasets": "[]",  # configs/digits.yaml evaluates on data/digits, which tests do not build
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def tiny_config(**extra: object) -> Config:
    """The tiny image-text config of `tiny_overrides`, with extra `key.sub: value` settings."""
    return config_lib.load(None, tiny_overrides("unused.tar", **extra))


def tiny_model(seed: int = 0, **extra: object) -> MultiEncoder:
    """A freshly initialised tiny image-text model (seeded), with extra `key.sub: value` settings."""
    cfg = tiny_config(**extra)
    torch.manual_seed(seed)
    return MultiEncoder(cfg.model)


def unit(*shape: int, seed: int) -> torch.Tensor:
    """Random unit-norm rows in float64, a leaf that requires gradients."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
