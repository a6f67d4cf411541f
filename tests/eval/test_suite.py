"""The evaluation suite on real data: both dataset layouts, several datasets in one call, every report,
agreement with open_clip's own zero-shot path, evaluation during training."""

import io
import json

import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

from mmcl import config as config_lib
from mmcl.checkpoint import convert
from mmcl.checkpoint import state as checkpoints
from mmcl.cli import main
from mmcl.data import InputSpec, build_eval_loader
from mmcl.errors import DataError
from mmcl.eval.suite import evaluate_all
from mmcl.eval.zeroshot import class_embeddings

from conftest import REPO, held_out_samples, tiny_model, tiny_overrides

FIELDS = {"image": "png", "text": "txt"}


def test_folder_layout_reads_the_same_samples_as_the_shards(digits_root, folder_root, tmp_path):
    model = tiny_model().eval()
    (folder_root / "classnames.txt").write_text((digits_root / "classnames.txt").read_text())
    try:
        results = evaluate_all(
            model,
            [str(digits_root), str(folder_root)],
            FIELDS,
            64,
            [1, 5],
            tmp_path / "eval.json",
            torch.device("cpu"),
            progress=False,
            quiet=True,
        )
    finally:
        (folder_root / "classnames.txt").unlink()
    shards, folders = results[digits_root.name], results[folder_root.name]
    assert shards["samples"] == folders["samples"] == 360
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert shards[name] == pytest.approx(folders[name], abs=1e-9), name
    # The probe's halves are drawn over the samples in reading order, which differs between layouts.
    assert 0 <= shards["linear_probe_acc1"] <= 1 and 0 <= folders["linear_probe_acc1"] <= 1
    assert "text_retrieval_recall@1" in shards and "text_retrieval_recall@1" not in folders  # no captions


def test_reports_for_several_datasets(digits_root, folder_root, tmp_path):
    evaluate_all(
        tiny_model().eval(),
        [str(digits_root), str(folder_root)],
        FIELDS,
        64,
        [1, 5],
        tmp_path / "eval.json",
        torch.device("cpu"),
        model_name="tiny",
        progress=False,
        quiet=True,
    )
    combined = json.loads((tmp_path / "eval.json").read_text())
    assert set(combined) == {digits_root.name, folder_root.name}
    assert (
        json.loads((tmp_path / "eval" / f"{folder_root.name}.json").read_text())["metrics"]["acc1"]
        == combined[folder_root.name]["acc1"]
    )
    record = json.loads((tmp_path / "eval" / f"{digits_root.name}.json").read_text())
    assert record["dataset"] == digits_root.name and record["model"] == "tiny"
    assert record["task"] == "zeroshot_classification" and record["language"] == "en"
    assert {"acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@5", "text_retrieval_recall@5"} <= set(
        record["metrics"]
    )  # CLIP_benchmark's field names
    markdown = (tmp_path / "eval.md").read_text().splitlines()
    assert markdown[0] == f"| metric | {digits_root.name} | {folder_root.name} |"
    assert any(line.startswith("| acc1 |") for line in markdown)
    for name in (digits_root.name, folder_root.name):
        png = tmp_path / "eval" / f"{name}-image-confusion.png"
        assert Image.open(png).size[0] > 100


def test_folder_layout_names_classes_from_folders(tmp_path, digit_pngs):
    from mmcl.eval.datasets import load_dataset

    for png, label in digit_pngs[:6]:
        folder = tmp_path / ("sea_lion" if label % 2 else "cat")
        folder.mkdir(exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.png").write_bytes(png)
    dataset = load_dataset(tmp_path)
    assert dataset.classnames == ["cat", "sea lion"] and dataset.templates[0] == "a photo of a {c}."
    assert [s["cls"] for s in dataset.folder_samples()].count(b"1") == len(list((tmp_path / "sea_lion").iterdir()))
    with pytest.raises(FileNotFoundError, match="neither shards"):
        load_dataset(tmp_path / "cat")


def test_mmcl_and_open_clip_zero_shot_agree_sample_by_sample(digits_root, digits_run, tmp_path):
    """A trained model (it separates the digits), exported as an open_clip checkpoint file: `mmcl eval
    --open-clip` and open_clip's own zero-shot classifier give the same logits for every held-out image,
    so the same predictions and the same accuracy."""
    cfg = config_lib.from_yaml((checkpoints.latest(digits_run) / "config.yaml").read_text())
    config_path, weights = convert.export_open_clip(
        checkpoints.load_weights(checkpoints.latest(digits_run)), cfg, tmp_path, "digits-tiny"
    )
    open_clip.add_model_config(config_path)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(weights),
                "--open-clip",
                "digits-tiny",
                "--datasets",
                str(digits_root),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())[digits_root.name]

    samples = held_out_samples(digits_root)
    classnames = (digits_root / "classnames.txt").read_text().split()
    templates = [t for t in (digits_root / "zeroshot_classification_templates.txt").read_text().split("\n") if t]
    labels = torch.tensor([label for _, _, label in samples])
    theirs = open_clip.create_model("digits-tiny", pretrained=str(weights)).eval()
    preprocess = image_transform(32, is_train=False)
    images = torch.stack([preprocess(Image.open(io.BytesIO(png)).convert("RGB")) for _, png, _ in samples])
    with torch.no_grad():
        classifier = build_zero_shot_classifier(
            theirs,
            open_clip.get_tokenizer("digits-tiny"),
            classnames,
            [lambda c, t=t: t.replace("{c}", c) for t in templates],
            num_classes_per_batch=10,
        )  # (D, C)
        their_logits = theirs.encode_image(images, normalize=True) @ classifier  # (N, C)

    # mmcl's side, sample by sample: the model `--open-clip` loads, mmcl's shard reader, transform and
    # prompt ensemble.
    model, _ = convert.open_clip_as_mmcl("digits-tiny", weights)
    model.eval()
    keys, rows = [], []
    inputs = {"image": InputSpec("image", ["png"], model.preprocessors(train=False)["image"])}
    with torch.no_grad():
        our_classifier = class_embeddings(
            model, model.preprocessors(train=False)["text"], classnames, templates, torch.device("cpu")
        )  # (C, D)
        for batch in build_eval_loader(str(digits_root / "test" / "0.tar"), inputs, 64):
            keys += [key.split("#")[1] for key in batch.keys]
            rows.append(model.encode("image", batch.inputs["image"]) @ our_classifier.T)
    assert keys == [key for key, _, _ in samples]
    our_logits = torch.cat(rows)  # (N, C)
    torch.testing.assert_close(our_logits, their_logits, rtol=0, atol=1e-5)
    assert torch.equal(our_logits.argmax(dim=1), their_logits.argmax(dim=1))
    accuracy = (their_logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.5  # a model that separates the classes (chance: 0.1)
    assert ours["acc1"] == pytest.approx(accuracy, abs=1e-9)
    top5 = their_logits.topk(5, dim=1).indices
    assert ours["acc5"] == pytest.approx((top5 == labels[:, None]).any(dim=1).float().mean().item(), abs=1e-9)


def test_evaluation_during_training_changes_nothing_in_the_run(digits_root, tmp_path):
    def run(name, **extra):
        overrides = tiny_overrides(
            f"{digits_root}/train/{{000000..000005}}.tar",
            **{
                "run.output_dir": tmp_path,
                "run.name": name,
                "run.steps": 12,
                "eval.datasets": f"[{digits_root}]",
                "optim.warmup_steps": 2,
                "model.towers.image.options.patch_dropout": 0.5,
                **extra,
            },
        )
        assert main(["train", str(REPO / "configs/digits.yaml"), *overrides]) == 0
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain")
    with_eval = run("with_eval", **{"eval.every_steps": 5})
    assert plain == with_eval  # bitwise: evaluation draws nothing from the run's RNG
    run_dir = tmp_path / "with_eval"
    assert sorted(p.name for p in (run_dir / "eval_steps").glob("*.json")) == [
        "step_00000005.json",
        "step_00000010.json",
    ]
    history = [json.loads(line) for line in (run_dir / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [5, 10] and "acc1" in history[0]["results"]["digits"]
    assert (run_dir / "eval.json").is_file()  # and the final evaluation


def test_plain_shard_set_from_data_prep_is_evaluated_by_retrieval(tmp_path, digit_pngs):
    from data_prep.pairs import folder_pairs, write_pairs

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    source = tmp_path / "raw"
    source.mkdir()
    for i, (png, label) in enumerate(digit_pngs[:24]):
        (source / f"d{i}.png").write_bytes(png)
        (source / f"d{i}.txt").write_text(f"a handwritten {words[label]}")
    write_pairs(folder_pairs(source), tmp_path / "shards", progress=False)
    results = evaluate_all(
        tiny_model().eval(),
        [str(tmp_path / "shards")],
        FIELDS,
        8,
        [1, 5],
        tmp_path / "eval.json",
        torch.device("cpu"),
        progress=False,
        quiet=True,
    )["shards"]
    assert results["samples"] == 24 and results["classes"] == 0 and "acc1" not in results
    assert 0 <= results["text_retrieval_recall@1"] <= results["text_retrieval_recall@5"] <= 1
    record = json.loads((tmp_path / "eval" / "shards.json").read_text())
    assert record["task"] == "zeroshot_retrieval"


def test_caption_lists_in_json_are_read_as_one_per_line_captions_are(tmp_path, digit_pngs):
    """img2dataset/COCO-style metadata: a sample's captions as a JSON list under a key (json:captions) are
    several captions of the sample in retrieval, exactly as the same captions one per line in a .txt."""
    from data_prep.writer import ShardSetWriter

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for name in ("as_json", "as_lines"):
        with ShardSetWriter(tmp_path / name, 12) as writer:
            for i, (png, label) in enumerate(digit_pngs[:24]):
                captions = [f"a handwritten {words[label]}", f"the digit {label}", f"a {words[label]}"]
                field = (
                    {"json": json.dumps({"captions": captions})} if name == "as_json" else {"txt": "\n".join(captions)}
                )
                writer.write({"__key__": f"s{i:02d}", "png": png, **field})
    model = tiny_model().eval()
    results = {
        name: evaluate_all(
            model,
            [str(tmp_path / name)],
            {"image": "png", "text": text_field},
            8,
            [1, 5],
            tmp_path / f"{name}.json",
            torch.device("cpu"),
            progress=False,
            quiet=True,
        )[name]
        for name, text_field in (("as_json", "json:captions"), ("as_lines", "txt"))
    }
    assert results["as_json"]["samples"] == 24 and results["as_json"].get("skipped", 0) == 0
    recalls = [k for k in results["as_lines"] if "recall@" in k]
    assert recalls and all(results["as_json"][k] == results["as_lines"][k] for k in recalls)


def test_a_set_none_of_whose_samples_reads_stops_naming_it(tmp_path, digit_pngs):
    from data_prep.writer import ShardSetWriter

    with ShardSetWriter(tmp_path / "unreadable", 12) as writer:
        for i, (png, _) in enumerate(digit_pngs[:6]):
            writer.write({"__key__": f"s{i}", "png": png, "json": json.dumps({"caption": "no list here"})})
    with pytest.raises(DataError, match=r"unreadable: none of its samples could be read \(6 skipped.*json:captions"):
        evaluate_all(
            tiny_model().eval(),
            [str(tmp_path / "unreadable")],
            {"image": "png", "text": "json:captions"},
            8,
            [1],
            tmp_path / "eval.json",
            torch.device("cpu"),
            progress=False,
            quiet=True,
        )


def test_unreadable_samples_after_the_last_batch_are_counted(tmp_path, digit_pngs):
    """A corrupt image among the last samples of a set leaves no batch to carry its count: it is still
    reported as skipped."""
    from data_prep.writer import ShardSetWriter

    with ShardSetWriter(tmp_path / "tail", 12) as writer:
        for i, (png, label) in enumerate(digit_pngs[:10]):
            image = png if i < 8 else png[:40]  # the last two images cut short
            writer.write({"__key__": f"s{i}", "png": image, "txt": f"a handwritten {label}"})
    results = evaluate_all(
        tiny_model().eval(),
        [str(tmp_path / "tail")],
        FIELDS,
        4,  # two full batches of readable samples, then only the two unreadable ones
        [1],
        tmp_path / "eval.json",
        torch.device("cpu"),
        progress=False,
        quiet=True,
    )["tail"]
    assert results["samples"] == 8 and results["skipped"] == 2
