"""The caption-choice task (SugarCrepe's and ARO's): the metric against a slow loop, its tie rule, the
dataset layout, and the compositional digits set data_prep writes for it. (Agreement with
CLIP_benchmark's image_caption_selection: tests/eval/test_clip_benchmark.py.)"""

import tarfile

import pytest
import torch

from data_prep.digit_pairs import pair_captions, prepare_digit_pairs
from mmcl.errors import DataError
from mmcl.eval.caption_choice import caption_choice_accuracy
from mmcl.eval.datasets import load_dataset


def slow_accuracy(query, true_rows, wrong_rows):
    """Transcribed from the task's definition: one trial per true caption, won when it scores above every
    wrong caption of its sample; t wrong captions tying with it (none above): a win with chance 1/(t+1)."""
    trials = []
    for q, trues, wrongs in zip(query, true_rows, wrong_rows, strict=True):
        for t in trues:
            true_score = float(q @ t)
            wrong_scores = [float(q @ w) for w in wrongs]
            if any(s > true_score for s in wrong_scores):
                trials.append(0.0)
            else:
                trials.append(1.0 / (1 + sum(s == true_score for s in wrong_scores)))
    return sum(trials) / len(trials)


def ragged(rows):
    return torch.cat(rows), torch.tensor([len(r) for r in rows])


def test_accuracy_matches_the_slow_loop_with_ragged_captions_and_ties():
    generator = torch.Generator().manual_seed(0)
    samples, width = 40, 8
    # Coarse values (multiples of 1/2) so that many scores tie exactly.
    query = torch.randint(-2, 3, (samples, width), generator=generator).float() / 2
    true_rows = [torch.randint(-2, 3, (1 + i % 3, width), generator=generator).float() / 2 for i in range(samples)]
    wrong_rows = [torch.randint(-2, 3, (1 + i % 4, width), generator=generator).float() / 2 for i in range(samples)]
    true_emb, true_counts = ragged(true_rows)
    wrong_emb, wrong_counts = ragged(wrong_rows)
    ours = caption_choice_accuracy(query, true_emb, true_counts, wrong_emb, wrong_counts)
    assert ours == pytest.approx(slow_accuracy(query, true_rows, wrong_rows), abs=1e-12)
    scores = [float(q @ t) for q, ts in zip(query, true_rows, strict=True) for t in ts]
    assert len(set(scores)) < len(scores)  # the data does hold ties


def test_a_model_blind_to_the_difference_scores_chance_not_zero_or_one():
    query = torch.randn(10, 4)
    captions = torch.randn(10, 4)
    for wrong_per_sample in (1, 3):
        wrong = captions.repeat_interleave(wrong_per_sample, dim=0)  # every wrong caption embeds as the true one
        counts = torch.full((10,), wrong_per_sample)
        accuracy = caption_choice_accuracy(query, captions, torch.ones(10, dtype=torch.long), wrong, counts)
        assert accuracy == pytest.approx(1 / (1 + wrong_per_sample))
    # A wrong caption above the true one loses the trial whatever the others do.
    true = torch.tensor([[1.0, 0.0]])
    wrong = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    one = torch.ones(1, dtype=torch.long)
    assert caption_choice_accuracy(torch.tensor([[1.0, 0.0]]), true, one, wrong, torch.tensor([2])) == 0.0


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_for_choice")  # numbered: test_clip_benchmark owns "digit_pairs"
    prepare_digit_pairs(root)
    return root


def test_digit_pairs_write_a_caption_choice_set_of_order_swaps(pairs_root):
    dataset = load_dataset(pairs_root / "order")
    assert dataset.task == "caption_choice" and {"png", "txt", "neg.txt"} <= dataset.fields
    assert load_dataset(pairs_root).task == "retrieval"
    with tarfile.open(dataset.shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = {name.split(".", 1)[0] for name in members}
    assert len(keys) == 90 * 3  # every test image once per phrasing
    for key in keys:
        left, right, phrasing = int(key[4]), int(key[5]), int(key.rsplit("_", 1)[1])
        assert members[f"{key}.txt"].decode() == pair_captions(left, right)[phrasing]
        assert members[f"{key}.neg.txt"].decode() == pair_captions(right, left)[phrasing]


def test_a_caption_choice_set_without_wrong_captions_is_refused(pairs_root, tmp_path):
    broken = tmp_path / "no_negatives"
    (broken / "test").mkdir(parents=True)
    (broken / "dataset_type.txt").write_text("caption_choice\n")
    with tarfile.open(pairs_root / "test" / "0.tar") as source, tarfile.open(broken / "test" / "0.tar", "w") as out:
        for member in source.getmembers()[:4]:
            out.addfile(member, source.extractfile(member))
    with pytest.raises(DataError, match="neg.txt"):
        load_dataset(broken)
    (broken / "dataset_type.txt").write_text("winoground\n")
    with pytest.raises(DataError, match="caption_choice"):
        load_dataset(broken)
