"""Bad data, broken numerics, crashes and full disks: skipped and counted, or stopped with a clear
message, and never a lost or half-written checkpoint."""

import io
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data_prep.writer import ShardSetWriter
from mmcl.checkpoint import state as checkpoints
from mmcl.cli import main
from mmcl.data import InputSpec, build_eval_loader
from mmcl.data.decode import SampleError, decode_image
from mmcl.errors import TrainingHalted
from mmcl.models import MultiEncoder
from mmcl.train.engine import TorchEngine
from mmcl.train.run_state import RunState, check_health

from conftest import REPO, tiny_config, tiny_overrides


def torch_engine(cfg):
    return TorchEngine(MultiEncoder(cfg.model), cfg.optim, cfg.run.steps)


def test_decompression_bomb_is_refused_without_decoding():
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 Mpixel, a few kB on disk
    with pytest.raises(SampleError, match="unreadable image"):
        decode_image(buffer.getvalue())


def test_bomb_and_garbage_in_a_shard_are_skipped(tmp_path, digit_pngs):
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    with ShardSetWriter(tmp_path, 100) as writer:
        writer.write({"__key__": "bomb", "png": buffer.getvalue(), "txt": "x"})
        for i, (png, _) in enumerate(digit_pngs[:3]):
            writer.write({"__key__": f"ok{i}", "png": png, "txt": "a digit"})
    inputs = {"image": InputSpec("image", ["png"], lambda im: torch.tensor(im.size))}
    batches = list(build_eval_loader(str(tmp_path / "000000.tar"), inputs, batch_size=10))
    assert [k.split("#")[1] for k in batches[0].keys] == ["ok0", "ok1", "ok2"] and batches[0].skipped == 1


def test_too_much_bad_data_stops_the_run_with_a_clear_message(tmp_path, digit_pngs, capsys):
    with ShardSetWriter(tmp_path / "shards", 1000) as writer:
        for i in range(400):
            png = digit_pngs[i % 40][0] if i % 3 == 0 else b"\x89PNG garbage"
            writer.write({"__key__": f"s{i}", "png": png, "txt": "a digit"})
    overrides = tiny_overrides(
        str(tmp_path / "shards" / "000000.tar"),
        **{
            "run.output_dir": tmp_path / "runs",
            "run.steps": 50,
            "data.batch_size": 8,
            "data.max_skipped_fraction": 0.2,
        },
    )
    assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "data.max_skipped_fraction=0.2" in err


def halting_worker(rank, world, overrides, out_dir):
    from mmcl import config as config_lib
    from mmcl.train.trainer import train

    try:
        train(config_lib.load(None, overrides))
        message = "no halt"
    except TrainingHalted as error:
        message = str(error)
    (out_dir / f"{rank}.txt").write_text(message)


def test_bad_data_on_one_process_stops_every_process(tmp_path, digit_pngs):
    """Each process counts its own unreadable samples; when one process's shard is mostly garbage, every
    process stops (the health check is collective) instead of the others waiting in a collective."""
    with ShardSetWriter(tmp_path / "shards", 300) as writer:
        for i in range(600):  # shard 0: readable digits; shard 1: mostly garbage
            png = digit_pngs[i % 40][0] if i < 300 or i % 5 == 0 else b"\x89PNG garbage"
            writer.write({"__key__": f"s{i}", "png": png, "txt": "a digit"})
    overrides = tiny_overrides(
        f"{tmp_path}/shards/{{000000..000001}}.tar",
        **{
            "run.output_dir": tmp_path / "runs",
            "run.steps": 60,
            "data.batch_size": 8,
            "data.shuffle_buffer": 0,
            "data.max_skipped_fraction": 0.2,
            "engine.backend": "deepspeed",
        },
    )
    from launch import launch

    launch(halting_worker, 2, overrides, tmp_path)
    messages = [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)]
    assert sum("data.max_skipped_fraction=0.2" in m for m in messages) == 1, messages  # the one that saw it
    assert sum("another process found the run unhealthy" in m for m in messages) == 1, messages


def test_health_check_names_the_budget():
    check_health(RunState(nonfinite_in_a_row=2, samples_skipped=5, samples_seen=100), 3, 0.1)  # within both budgets
    with pytest.raises(TrainingHalted, match="optim.max_nonfinite_steps=3"):
        check_health(RunState(nonfinite_in_a_row=3, samples_skipped=0, samples_seen=100), 3, 0.1)
    with pytest.raises(TrainingHalted, match="data.max_skipped_fraction=0.1"):
        check_health(RunState(nonfinite_in_a_row=0, samples_skipped=20, samples_seen=100), 3, 0.1)


def test_nonfinite_gradients_skip_the_update():
    cfg = tiny_config()
    engine = torch_engine(cfg)
    model = engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    embeddings, scale, _ = engine.forward({"image": images, "text": torch.randint(1, 999, (4, 16))})
    (scale * embeddings["image"] @ embeddings["text"].T).logsumexp(1).sum().backward()
    result = engine.step()
    assert result["nonfinite"] == 1.0 and math.isnan(result["grad_norm"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # no NaN reached the weights


class Exploding:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmcl-pwned",))


def test_checkpoint_files_are_never_unpickled_blindly(tmp_path):
    engine = torch_engine(tiny_config())
    path = checkpoints.save(
        tmp_path, 1, engine, {"samples_seen": 0, "samples_skipped": 0, "data_position": [(0, 0)]}, "{}", keep_last=2
    )
    (path / "rng_0.pt").write_bytes(pickle.dumps(Exploding()))
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load(path, engine)
    assert not os.path.exists("/tmp/mmcl-pwned")


SAVER = """
import io, os, sys, time
sys.path.insert(0, {tests!r})
import safetensors.torch
import torch
from conftest import tiny_config
from mmcl.checkpoint import state as checkpoints
from mmcl.models import MultiEncoder
from mmcl.train.engine import TorchEngine

cfg = tiny_config()
engine = TorchEngine(MultiEncoder(cfg.model), cfg.optim, cfg.run.steps)
meta = {{"data_position": [(0, 0)]}}
checkpoints.save({run!r}, 1, engine, meta, "{{}}", keep_last=2)


def block(where):
    print("blocked", where, flush=True)  # the test kills this process now
    time.sleep(600)


def write_half_then_block(data, path, where):
    with open(path, "wb") as file:
        file.write(data[:len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
    block(where + " " + str(len(data)))


save_torch, rename, replace = torch.save, os.rename, os.replace
point = {point!r}
if point == "engine state":  # torch.save of engine.pt, half written
    def torch_save(obj, path, *args, **kwargs):
        if str(path).endswith("engine.pt"):
            buffer = io.BytesIO()
            save_torch(obj, buffer)
            write_half_then_block(buffer.getvalue(), path, point)
        save_torch(obj, path, *args, **kwargs)
    torch.save = torch_save
elif point == "weights":  # model.safetensors, half written
    checkpoints.save_file = lambda tensors, path: write_half_then_block(safetensors.torch.save(tensors), path, point)
elif point == "rename":  # every file written and synced, the directory not yet renamed into place
    os.rename = lambda *args: block(point)
elif point == "latest":  # the step directory in place, `latest` not yet pointed at it
    os.replace = lambda source, target: block(point) if str(target).endswith("latest") else replace(source, target)
checkpoints.save({run!r}, 2, engine, meta, "{{}}", keep_last=2)
print("not blocked", flush=True)
"""


@pytest.mark.parametrize("point", ["engine state", "weights", "rename", "latest"])
def test_kill_9_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, point):
    """The saving process blocks at `point` of writing checkpoint 2 (files half written, or between the
    renames that publish it) and is killed there: checkpoint 1 stays the latest, whole and loadable,
    and the next save clears the debris."""
    script = SAVER.format(tests=str(REPO / "tests"), run=str(tmp_path), point=point)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(f"blocked {point}"), line
    process.send_signal(signal.SIGKILL)
    process.wait()

    if point in ("engine state", "weights"):  # the kill landed inside the write: a partial file is left
        partial = (
            tmp_path
            / "checkpoints"
            / ".tmp_step_00000002"
            / ("engine.pt" if point == "engine state" else "model.safetensors")
        )
        assert 0 < partial.stat().st_size < int(line.split()[-1])
    latest = checkpoints.latest(tmp_path)
    assert latest.name == "step_00000001" and checkpoints.read_meta(latest)["step"] == 1
    assert checkpoints.load_weights(latest)  # complete and loadable
    engine = torch_engine(tiny_config())
    checkpoints.load(latest, engine)

    assert checkpoints.save(tmp_path, 2, engine, {"data_position": [(0, 0)]}, "{}", keep_last=2).name == "step_00000002"
    assert checkpoints.latest(tmp_path).name == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    script = f"""
import resource, signal, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
from conftest import tiny_overrides
from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.errors import CheckpointError
from mmcl.models import MultiEncoder
from mmcl.train.engine import TorchEngine
cfg = config_lib.load(None, tiny_overrides("unused.tar"))
engine = TorchEngine(MultiEncoder(cfg.model), cfg.optim, cfg.run.steps)
meta = {{"samples_seen": 0, "samples_skipped": 0, "data_position": [(0, 0)]}}
checkpoints.save({str(tmp_path)!r}, 1, engine, meta, "{{}}", keep_last=2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    checkpoints.save({str(tmp_path)!r}, 2, engine, meta, "{{}}", keep_last=2)
except CheckpointError as error:
    print("ERROR", error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR could not write the checkpoint of step 2" in result.stdout, result.stderr
    assert "step_00000001" in result.stdout  # the message names the checkpoint that is kept
    assert checkpoints.latest(tmp_path).name == "step_00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp_step_*"))  # no debris
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def flac_tone(seconds=0.3, rate=16000):
    import numpy as np
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, 0.3 * np.sin(np.arange(int(seconds * rate)) * 0.2), rate, format="FLAC")
    return out.getvalue()


def test_corrupt_audio_in_a_shard_is_skipped_and_counted(tmp_path, caplog):
    from mmcl.models.audio import AudioPreprocess, AudioSettings

    good = flac_tone()
    with ShardSetWriter(tmp_path, 100) as writer:
        writer.write({"__key__": "ok0", "flac": good, "txt": "a tone"})
        writer.write({"__key__": "truncated", "flac": good[: len(good) // 8], "txt": "a tone"})
        writer.write({"__key__": "garbage", "wav": b"RIFF....WAVEfmt garbage", "txt": "a tone"})
        writer.write({"__key__": "empty", "flac": b"", "txt": "a tone"})
        writer.write({"__key__": "ok1", "wav": good, "txt": "a tone"})  # FLAC bytes named .wav: libsndfile sniffs
    settings = AudioSettings(clip_seconds=0.5, n_mels=16, patch_freq=4, patch_time=4)
    inputs = {"audio": InputSpec("audio", ["flac", "wav"], AudioPreprocess(settings, train=False))}
    batches = list(build_eval_loader(str(tmp_path / "000000.tar"), inputs, batch_size=10))
    assert [k.split("#")[1] for k in batches[0].keys] == ["ok0", "ok1"]
    assert batches[0].skipped == 3
    assert batches[0].inputs["audio"].shape == (2, 16, settings.frames)
    assert "truncated" in caplog.text and "unreadable audio" in caplog.text


def test_missing_modalities_are_skipped_when_required_and_masked_when_optional(tmp_path, digit_pngs):
    with ShardSetWriter(tmp_path, 100) as writer:
        writer.write({"__key__": "both", "png": digit_pngs[0][0], "txt": "a digit"})
        writer.write({"__key__": "no_image", "txt": "a digit"})
        writer.write({"__key__": "image_only", "png": digit_pngs[1][0]})
        writer.write({"__key__": "clip", "flac": flac_tone(), "txt": "a digit"})
    shard = str(tmp_path / "000000.tar")
    text = InputSpec("text", ["txt"], lambda s: torch.tensor([len(s)]))
    required = {"image": InputSpec("image", ["png"], lambda im: torch.ones(2)), "text": text}
    batch = list(build_eval_loader(shard, required, batch_size=10))[0]
    assert [k.split("#")[1] for k in batch.keys] == ["both"] and batch.skipped == 3
    optional = {
        "image": InputSpec("image", ["png"], lambda im: torch.ones(2), placeholder=torch.zeros(2)),
        "audio": InputSpec("audio", ["flac"], lambda wave: torch.full((2,), 2.0), placeholder=torch.zeros(2)),
        "text": text,
    }
    batch = list(build_eval_loader(shard, optional, batch_size=10))[0]
    # "no_image" is left with its text alone, nothing to contrast; "image_only" lacks the required text.
    assert [k.split("#")[1] for k in batch.keys] == ["both", "clip"] and batch.skipped == 2
    assert batch.present["image"].tolist() == [True, False] and batch.present["audio"].tolist() == [False, True]
    assert batch.inputs["image"].tolist() == [[1, 1], [0, 0]] and batch.inputs["audio"].tolist() == [[0, 0], [2, 2]]


def nonfinite_deepspeed_worker(rank, world, stage, out):
    from mmcl.train.engine import DeepSpeedEngine, StepShape

    cfg = tiny_config(**{"engine.backend": "deepspeed", "engine.zero_stage": stage, "engine.device": "cpu"})
    engine = DeepSpeedEngine(
        MultiEncoder(cfg.model), cfg.engine, cfg.optim, StepShape(cfg.run.steps, 4, 1), torch.device("cpu")
    )
    before = {k: v.clone() for k, v in engine.model_state().items()}
    images = torch.randn(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    embeddings, scale, _ = engine.forward({"image": images, "text": torch.randint(1, 999, (4, 16))})
    engine.backward((scale * embeddings["image"] @ embeddings["text"].T).logsumexp(1).sum())
    result = engine.step()
    after = engine.model_state()
    torch.save({"result": result, "changed": [k for k in before if not torch.equal(after[k], before[k])]}, out)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nonfinite_gradients_skip_the_update_under_deepspeed(tmp_path, stage):
    from launch import launch

    launch(nonfinite_deepspeed_worker, 1, stage, str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["result"]["nonfinite"] == 1.0
    assert out["changed"] == []  # no NaN reached the weights, and no optimiser step moved them


def test_user_mistakes_are_one_line_errors_not_tracebacks(tmp_path, capsys):
    """Exit status 2 and one line naming what is wrong, for mistakes a user makes with their files."""
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "bad.yaml").write_text("run: {steps: [1,\n")
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text("data: {train: x.tar, bogus: 1}\n")
    torch.manual_seed(0)
    torch.save(MultiEncoder(tiny_config().model).state_dict(), tmp_path / "mmcl-state.pt")
    cases = [
        (("prep", "folder", tmp_path / "missing", "--out", tmp_path / "o1"), "no such folder"),
        (("prep", "manifest", tmp_path / "bad.jsonl", "--out", tmp_path / "o2"), "bad.jsonl:2: not a JSON object"),
        (("prep", "manifest", tmp_path / "bad.parquet", "--out", tmp_path / "o3"), "not a readable parquet file"),
        (("train", tmp_path / "bad.yaml"), "not valid YAML"),
        (("eval", checkpoint, "--datasets", tmp_path), "not a config this version of mmcl reads"),
        (
            ("eval", tmp_path / "mmcl-state.pt", "--open-clip", "mmcl-tiny", "--datasets", tmp_path),
            "does not hold a mmcl-tiny model",
        ),
        (("convert", "from-hf", tmp_path / "missing", "--out", tmp_path / "o4"), "not a CLIPModel directory"),
    ]
    for argv, message in cases:
        status = main([str(part) for part in argv])  # an exception other than a user error would propagate
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith("mmcl ")]  # besides progress bars
        assert status == 2 and len(errors) == 1 and message in errors[0], (argv, stderr[-1500:])


def test_an_internal_defect_keeps_its_traceback(tmp_path):
    """Anything that is not a user error is a defect: its traceback is printed (exit status 1)."""
    script = (
        "import sys\nimport mmcl.cli as cli\n\n\ndef broken(args):\n    raise KeyError('a defect')\n\n\n"
        "cli._convert = broken\nsys.exit(cli.main(['convert', 'zero-fp32', 'x', '--out', 'y']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'a defect'" in result.stderr
