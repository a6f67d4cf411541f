"""A real install: the built wheel, installed into a fresh virtual environment (not the editable checkout),
carries its presets and example configs, and `mmcl init` plus a few training steps run from it."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO


def run(*command, cwd: Path):
    # Away from the checkout, and with no PYTHONPATH: mmcl must come from where the command installed it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_the_wheel_installs_into_a_fresh_environment_and_trains(tmp_path, digits_root):
    # Built from a copy: setuptools writes its build/ folder beside the sources.
    source = tmp_path / "source"
    skipped = {".venv", ".git", "data", "runs", "build"}  # at the top only: mmcl/data is a package

    def ignore(folder, names):
        return [name for name in names if Path(folder) == REPO and name in skipped]

    shutil.copytree(REPO, source, symlinks=True, ignore=ignore)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "-w",
        tmp_path / "dist",
        source,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("mmcl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"mmcl/configs/digits.yaml", "mmcl/models/presets/mmcl-tiny.json", "data_prep/digits.py"} <= set(names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    # The dependencies come from this environment (installing torch again takes minutes): a .pth file
    # puts its site-packages after the fresh environment's own, so mmcl itself comes from the wheel.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh_site = Path(run(venv / "bin" / "python", "-c", purelib, cwd=tmp_path).strip())
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert run(venv / "bin" / "python", "-c", "import mmcl; print(mmcl.__file__)", cwd=tmp_path).startswith(
        str(fresh_site)
    )

    work = tmp_path / "work"
    work.mkdir()
    assert "mmcl train mine.yaml" in run(venv / "bin" / "mmcl", "init", "mine", cwd=work)
    run(
        venv / "bin" / "mmcl",
        "train",
        "mine.yaml",
        f"data.train={digits_root}/train/{{000000..000005}}.tar",
        "data.batch_size=16",
        "data.workers=0",
        "run.steps=3",
        "run.progress=false",
        "eval.datasets=[]",
        cwd=work,
    )
    assert (work / "runs" / "mine" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    run(venv / "bin" / "python", "-m", "mmcl", "init", "other", "--from", "spoken_digits", cwd=work)
    assert "audio_spectrogram" in (work / "other.yaml").read_text()  # any bundled config, by name
