"""The validation loss on held-out shards (data.val) and the best checkpoint (run.keep_best).

val_loss equals a slow float64 recomputation of CLIP's loss over the held-out set from the checkpoint's
weights; a run validating trains bitwise as one that does not; two processes under ZeRO-2 give one
process's val_loss; `best` follows the best value, survives pruning and resume, and a crash mid-save
never leaves it naming a partial checkpoint."""

import json
import math
import signal
import subprocess
import sys
import tarfile
from dataclasses import asdict

import pytest
import torch
import torch.distributed as torch_dist

from mmcl import config as config_lib
from mmcl.checkpoint import state as checkpoints
from mmcl.checkpoint.saved_model import checkpoint_dir
from mmcl.data.decode import decode_image, decode_text
from mmcl.errors import ConfigError
from mmcl.models import MultiEncoder, load_model
from mmcl.train.best import KeepBest
from mmcl.train.engine import TorchEngine
from mmcl.train.metrics_log import read_records
from mmcl.train.run_state import RunState
from mmcl.train.trainer import Trainer, check_config, train

from conftest import REPO, tiny_config, tiny_overrides
from launch import launch

STEPS = 6
VAL_EVERY = 3
BATCH = 32


def train_urls(root):
    return f"{root}/train/{{000000..000004}}.tar"


VAL_SAMPLES = 100  # 3 full batches of 32, and 4 samples that fill none


def val_urls(root):
    """A held-out shard: the first VAL_SAMPLES samples of the digits' shard 000005 (not trained on)."""
    shard = root / "val" / "000000.tar"
    if not shard.exists():
        shard.parent.mkdir(exist_ok=True)
        with tarfile.open(root / "train" / "000005.tar") as source, tarfile.open(shard, "w") as held_out:
            for member in source.getmembers()[: 2 * VAL_SAMPLES]:  # png and txt of each sample
                held_out.addfile(member, source.extractfile(member))
    return str(shard)


def overrides(root, out, name, validate, **extra):
    settings = {
        "run.output_dir": out,
        "run.name": name,
        "run.steps": STEPS,
        "run.checkpoint_every": VAL_EVERY,
        "run.keep_last": 10,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-3,
        "data.batch_size": BATCH,
        # Patch dropout draws from the model's RNG every training step: validation drawing from it, or
        # leaving the model in eval mode, would change the training.
        "model.towers.image.options.patch_dropout": 0.5,
        **({"data.val": val_urls(root), "eval.val_every": VAL_EVERY, "run.keep_best": "val_loss"} if validate else {}),
        **extra,
    }
    return tiny_overrides(train_urls(root), **settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    """The same tiny run without and with validation (single process, torch engine)."""
    out = tmp_path_factory.mktemp("val_runs")
    for name, validate in (("plain", False), ("validated", True)):
        train(config_lib.load(None, overrides(digits_root, out, name, validate)))
    return out


def test_training_is_bitwise_the_same_with_validation(runs):
    plain, validated = read_records(runs / "plain/metrics.jsonl"), read_records(runs / "validated/metrics.jsonl")
    assert [r["step"] for r in plain] == [r["step"] for r in validated] == list(range(1, STEPS + 1))
    for a, b in zip(plain, validated, strict=True):
        assert (a["loss"], a["grad_norm"], a["logit_scale"]) == (b["loss"], b["grad_norm"], b["logit_scale"])
        assert "val_loss" not in a and ("val_loss" in b) == (b["step"] % VAL_EVERY == 0)
    last = f"checkpoints/step_{STEPS:08d}"
    want, got = checkpoints.load_weights(runs / "plain" / last), checkpoints.load_weights(runs / "validated" / last)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def held_out_pairs(shard):
    """(png bytes, caption bytes) of every sample of a shard, in the order the tar holds them."""
    samples = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(fields["png"], fields["txt"]) for fields in samples.values()]


def clip_loss_float64(image_emb, text_emb, scale):
    """CLIP's loss as the paper's Figure 3 writes it, in float64 loops: logits = I_e T_e^T exp(t);
    the mean of the cross-entropies over the rows (images) and the columns (texts), labels the diagonal."""
    n = len(image_emb)
    logits = [
        [scale * math.fsum(a * b for a, b in zip(image_emb[i], text_emb[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            top = max(row)
            total += top + math.log(math.fsum(math.exp(x - top) for x in row)) - row[i]
        return total / len(rows)

    columns = [list(column) for column in zip(*logits, strict=True)]
    return (cross_entropy(logits) + cross_entropy(columns)) / 2


def test_val_loss_equals_a_slow_recomputation(runs, digits_root):
    run = runs / "validated"
    cfg = config_lib.from_yaml((run / "config.yaml").read_text())
    pairs = held_out_pairs(val_urls(digits_root))
    full = len(pairs) // BATCH
    assert (len(pairs), full) == (VAL_SAMPLES, 3)  # the last 4 samples fill no batch and are left out
    logged = {r["step"]: r["val_loss"] for r in read_records(run / "metrics.jsonl") if "val_loss" in r}
    assert sorted(logged) == [3, 6]
    for step, val_loss in logged.items():
        weights = checkpoints.load_weights(run / "checkpoints" / f"step_{step:08d}")
        model = load_model(cfg.model, weights, torch.device("cpu"))
        preprocess = model.preprocessors(train=False)
        losses = []
        for b in range(full):
            chunk = pairs[b * BATCH : (b + 1) * BATCH]
            images = torch.stack([preprocess["image"](decode_image(png)) for png, _ in chunk])
            texts = torch.stack([preprocess["text"](decode_text(txt)) for _, txt in chunk])
            with torch.no_grad():
                encoded = model({"image": images, "text": texts})
            image_emb = encoded.embeddings["image"].double().tolist()
            text_emb = encoded.embeddings["text"].double().tolist()
            losses.append(clip_loss_float64(image_emb, text_emb, float(encoded.logit_scale)))
        assert abs(val_loss - math.fsum(losses) / full) < 2e-5, step


def test_best_follows_the_lowest_val_loss_and_survives_resume(runs, digits_root):
    run = runs / "validated"
    logged = {r["step"]: r["val_loss"] for r in read_records(run / "metrics.jsonl") if "val_loss" in r}
    best_step = min(logged, key=logged.get)
    assert checkpoints.best(run).name == f"step_{best_step:08d}"
    meta = checkpoints.read_meta(checkpoints.latest(run))
    assert (meta["best_value"], meta["best_step"]) == (logged[best_step], best_step)
    # mmcl eval / convert accept the run directory's best checkpoint
    assert checkpoint_dir(run / "best") == checkpoint_dir(run / "checkpoints" / "best") == checkpoints.best(run)

    resumed = Trainer(config_lib.load(None, [*overrides(digits_root, runs, "validated", True), "run.resume=latest"]))
    assert (resumed.state.best_value, resumed.state.best_step) == (logged[best_step], best_step)
    worse = {"val_loss": logged[best_step] + 1e-3}
    assert not resumed.best.observe(resumed.state, worse, None, evaluated=False)


def test_best_pointer_follows_better_then_worse_and_pruning_spares_it(tmp_path):
    cfg = tiny_config()
    engine = TorchEngine(MultiEncoder(cfg.model), cfg.optim, cfg.run.steps)
    keep, state = KeepBest("val_loss", "auto"), RunState()
    values = {1: 3.0, 2: 2.0, 3: 2.5, 4: 1.5, 5: 4.0, 6: 1.5}  # better, worse, better, worse, a tie
    expected = {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4}
    for step, value in values.items():
        state.step = step
        best = keep.observe(state, {"val_loss": value}, None, evaluated=False)
        meta = {**asdict(state), "data_position": [(0, 0)]}
        checkpoints.save(tmp_path, step, engine, meta, "{}", keep_last=1, best=best)
        assert checkpoints.best(tmp_path).name == f"step_{expected[step]:08d}", step
        assert checkpoints.read_meta(checkpoints.best(tmp_path))["best_value"] == values[expected[step]]
        kept = {p.name for p in (tmp_path / "checkpoints").glob("step_*")}
        assert kept == {f"step_{s:08d}" for s in {step, expected[step]}}, step  # keep_last=1, plus the best
    # A crash after step 7's best checkpoint was published, before `best` named it: the resumed run's
    # state names step 7, and `best` is pointed there.
    state.step, state.best_value, state.best_step = 7, 1.0, 7
    checkpoints.save(tmp_path, 7, engine, {**asdict(state), "data_position": [(0, 0)]}, "{}", keep_last=1)
    assert checkpoints.best(tmp_path).name == "step_00000004"
    keep.restore(RunState.from_meta(checkpoints.read_meta(checkpoints.latest(tmp_path))), tmp_path)
    assert checkpoints.best(tmp_path).name == "step_00000007"
    higher = KeepBest("digits/acc1", "auto")
    assert not higher.lower and KeepBest("digits/acc1", "min").lower and not KeepBest("val_loss", "max").lower


def test_best_by_an_evaluation_metric_includes_the_final_evaluation(tmp_path, digits_root):
    """keep_best=digits/acc1 (higher is better): evaluations at steps 2 and 4 during training, the final
    one at step 6 after the last checkpoint; `best` names the step of the highest acc1."""
    settings = {
        "run.keep_best": "digits/acc1",
        "run.checkpoint_every": 100,  # checkpoints only where a best forces one, and at the last step
        "run.keep_last": 1,
        "eval.datasets": f"[{digits_root}]",
        "eval.every_steps": 2,
        "eval.linear_probe.mode": "none",
        "optim.lr": 3e-3,
    }
    train(config_lib.load(None, overrides(digits_root, tmp_path, "run", False, **settings)))
    run = tmp_path / "run"
    acc = {r["step"]: r["results"]["digits"]["acc1"] for r in read_records(run / "eval_history.jsonl")}
    acc[STEPS] = json.loads((run / "eval.json").read_text())["digits"]["acc1"]
    assert sorted(acc) == [2, 4, 6]
    best_step = max(acc, key=lambda step: (acc[step], -step))  # a tie keeps the earlier
    assert checkpoints.best(run).name == f"step_{best_step:08d}"
    for checkpoint in (checkpoints.best(run), checkpoints.latest(run)):  # both record the best so far
        meta = checkpoints.read_meta(checkpoint)
        assert (meta["best_value"], meta["best_step"]) == (acc[best_step], best_step)


SAVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import safetensors.torch
from conftest import tiny_config
from mmcl.checkpoint import state as checkpoints
from mmcl.models import MultiEncoder
from mmcl.train.engine import TorchEngine

cfg = tiny_config()
engine = TorchEngine(MultiEncoder(cfg.model), cfg.optim, cfg.run.steps)
meta = {{"data_position": [(0, 0)]}}
checkpoints.save({run!r}, 1, engine, meta, "{{}}", keep_last=2, best=True)


def block(where):
    print("blocked", where, flush=True)  # the test kills this process now
    time.sleep(600)


point, rename, replace = {point!r}, os.rename, os.replace
if point == "weights":  # model.safetensors half written
    def half(tensors, path):
        data = safetensors.torch.save(tensors)
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
        block(point)
    checkpoints.save_file = half
elif point == "rename":  # every file written, the directory not yet renamed into place
    os.rename = lambda *args: block(point)
else:  # "latest" / "best": the step directory in place, that pointer not yet replaced
    os.replace = lambda source, target: block(point) if str(target).endswith(point) else replace(source, target)
checkpoints.save({run!r}, 2, engine, meta, "{{}}", keep_last=2, best=True)
print("not blocked", flush=True)
"""


@pytest.mark.parametrize("point", ["weights", "rename", "latest", "best"])
def test_a_crash_mid_save_never_leaves_best_naming_a_partial_checkpoint(tmp_path, point):
    script = SAVER.format(tests=str(REPO / "tests"), run=str(tmp_path), point=point)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(f"blocked {point}"), line
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "checkpoints" / "best").read_text().strip() == "step_00000001"
    best = checkpoints.best(tmp_path)
    assert best.name == "step_00000001" and checkpoints.load_weights(best)  # complete and loadable


def two_process_worker(rank, world, settings, out):
    trainer = Trainer(config_lib.load(None, settings))
    trainer.train()
    again = trainer.validation.loss()  # every process's own value of the collective result
    (out / f"val_rank{rank}.json").write_text(json.dumps(again))
    torch_dist.destroy_process_group()


def test_two_processes_under_zero2_give_one_process_val_loss(tmp_path, digits_root):
    """At learning rate 0 the weights stay the initial ones, so val_loss depends only on how the held-out
    set is batched, shared and averaged: 2 processes x 16 must equal 1 process x 32."""
    common = {"run.steps": 2, "eval.val_every": 2, "eval.val_batches": 2, "optim.lr": 0.0}
    one = overrides(digits_root, tmp_path, "one", True, **common)
    two = overrides(
        digits_root, tmp_path, "two", True, **common, **{"data.batch_size": BATCH // 2, "engine.backend": "deepspeed"}
    )
    two += ["engine.zero_stage=2"]
    train(config_lib.load(None, one))
    launch(two_process_worker, 2, two, tmp_path)
    want = [r["val_loss"] for r in read_records(tmp_path / "one/metrics.jsonl") if "val_loss" in r]
    got = [r["val_loss"] for r in read_records(tmp_path / "two/metrics.jsonl") if "val_loss" in r]
    assert len(want) == len(got) == 1 and abs(want[0] - got[0]) < 1e-5
    per_rank = [json.loads((tmp_path / f"val_rank{r}.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1] and abs(per_rank[0] - want[0]) < 1e-5


def test_settings_fail_before_compute_naming_the_key(tmp_path, digits_root):
    def check(**extra):
        check_config(config_lib.load(None, overrides(digits_root, tmp_path, "x", False, **extra)))

    with pytest.raises(ConfigError, match="'data.val'.*000099.tar"):
        check(**{"data.val": f"{digits_root}/train/000099.tar", "eval.val_every": 5})
    with pytest.raises(ConfigError, match="'data.val'.*empty shards"):
        check(**{"data.val": str(REPO / "tests/data/empty.tar"), "eval.val_every": 5})
    with pytest.raises(ConfigError, match="'eval.val_every'"):
        check(**{"eval.val_every": 5})
    with pytest.raises(ConfigError, match="'run.keep_best'.*val_loss needs data.val"):
        check(**{"run.keep_best": "val_loss"})
    with pytest.raises(ConfigError, match="'run.keep_best'.*imagenet/acc1"):
        check(**{"run.keep_best": "imagenet/acc1", "eval.datasets": f"[{digits_root}]"})
    with pytest.raises(ConfigError, match="'run.keep_best_mode'"):
        check(**{"run.keep_best_mode": "lowest"})
    check(**{"run.keep_best": "digits/acc1", "eval.datasets": f"[{digits_root}]"})  # a dataset it evaluates
