"""Evaluation metrics on small hand-checked cases."""

from itertools import permutations

import pytest
import torch

from mmcl.eval import classification_metrics, recall_at_k
from mmcl.eval.report import format_table


def test_classification_metrics_hand_checked():
    # 3 classes, 4 samples. Predictions (argmax): 0, 2, 2, 1; labels 0, 1, 2, 2.
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.3, 0.6], [0.0, 0.2, 0.8], [0.1, 0.7, 0.2]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels, num_classes=3)
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["acc5"] == 1.0  # with 3 classes, top-5 is top-3: always hit
    # per-class recall: class0 1/1, class1 0/1, class2 1/2 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_top5_misses_when_true_class_ranks_sixth():
    logits = torch.arange(10, dtype=torch.float)[None].flip(1)  # class 0 best, class 9 worst
    m = classification_metrics(logits, torch.tensor([5]), num_classes=10)
    assert m["acc1"] == 0 and m["acc5"] == 0
    m = classification_metrics(logits, torch.tensor([4]), num_classes=10)
    assert m["acc5"] == 1


def test_recall_at_k_hand_checked():
    query = torch.eye(3)
    # gallery row 0 matches query 0 best; query 1 prefers gallery 2, its own pair ranks 2nd; query 2 own ranks 3rd
    gallery = torch.tensor([[1.0, 0, 0.5], [0.1, 0.5, 0.9], [0.0, 0.8, 0.1]])
    r = recall_at_k(query, gallery, [1, 2, 3])
    assert r[1] == pytest.approx(1 / 3)
    assert r[2] == pytest.approx(2 / 3)
    assert r[3] == pytest.approx(1.0)


def test_table_lists_every_metric():
    table = format_table({"digits": {"samples": 3, "acc1": 0.5, "dataset": "digits"}})
    assert "acc1" in table and "50.0" in table and "digits" in table


def test_recall_at_k_by_class_counts_any_item_of_the_query_class():
    query = torch.eye(3)
    # scores = gallery.T: query 0 ranks gallery 1 (its class, not its own pair) first; queries 1 and 2
    # each find one item of another class ahead of their best class match.
    gallery = torch.tensor([[0.5, 0.0, 0.3], [0.9, 0.0, 0.0], [0.0, 0.2, 0.1]])
    labels = torch.tensor([0, 0, 1])
    by_pair = recall_at_k(query, gallery, [1, 2, 3])
    by_class = recall_at_k(query, gallery, [1, 2, 3], labels[:, None] == labels[None, :])
    assert by_pair[1] == pytest.approx(0.0)  # no query's own pair comes first
    assert by_class[1] == pytest.approx(1 / 3)  # query 0: gallery 1 shares its class
    assert by_class[2] == pytest.approx(1.0)
    # Query 1's own pair (score 0) ties with gallery 0 behind gallery 2 (0.2): rank 2 or 3, evenly.
    assert by_pair[2] == pytest.approx((1 + 0.5 + 1) / 3) and by_pair[3] == pytest.approx(1.0)


def test_linear_probe_separates_separable_features_and_not_noise():
    from mmcl.eval.linear_probe import linear_probe

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 16, generator=g) * 3
    separable = centres[labels] + torch.randn(200, 16, generator=g) * 0.5
    result = linear_probe(separable, labels)
    assert result["acc1"] == 1.0 and result["samples_fit"] == result["samples_scored"] == 100
    noise = linear_probe(torch.randn(200, 16, generator=g), labels)["acc1"]
    assert noise < 0.5  # chance is 0.25


def test_confusion_matrix_counts_predictions():
    from mmcl.eval.metrics import confusion_matrix

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1], [0.0, 0.1, 0.9]])
    matrix = confusion_matrix(logits, torch.tensor([0, 1, 1, 2]), 3)  # rows: true class, columns: predicted
    assert matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_recall_at_k_with_several_matches_per_query():
    """An image with three captions is found when any of them is within the top k."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # captions 0-2 belong to image 0, captions 3-4 to image 1
    captions = torch.tensor([[0.1, 0.9], [0.5, 0.6], [0.2, 0.3], [0.0, 0.8], [0.0, 0.7]])
    owner = torch.tensor([0, 0, 0, 1, 1])
    matches = torch.arange(2)[:, None] == owner[None, :]  # (2 images, 5 captions)
    # image 0 scores captions: 0.1, 0.5, 0.2, 0.0, 0.0 -> its caption 1 ranks first
    # image 1 scores captions: 0.9, 0.6, 0.3, 0.8, 0.7 -> caption 0 (image 0's) first, its own 3 second
    r = recall_at_k(image, captions, [1, 2], matches)
    assert r[1] == pytest.approx(0.5) and r[2] == pytest.approx(1.0)
    # captions as queries: each finds its own image at rank 1 or 2
    caption_r = recall_at_k(captions, image, [1], matches.T)
    assert caption_r[1] == pytest.approx(2 / 5)  # only captions 3 and 4 score their own image highest


def test_recall_at_k_ties_between_several_matches_and_non_matches():
    """One non-match and two matches tie for first place: in random order, the top 1 holds a match with
    probability 2/3; a single match tied with two non-matches: 1/3 at k=1, 2/3 at k=2."""
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    two_matches = torch.tensor([[True, True, False, False]])
    assert recall_at_k(query, gallery, [1], two_matches)[1] == pytest.approx(2 / 3)
    one_match = torch.tensor([[True, False, False, False]])
    r = recall_at_k(query, gallery, [1, 2, 3], one_match)
    assert (r[1], r[2], r[3]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(1.0))

    # and by enumeration of the orders: every permutation of the 3 tied items alike
    def chance(matches: list, k: int) -> float:
        orders = list(permutations(matches))
        return sum(any(order[:k]) for order in orders) / len(orders)

    assert recall_at_k(query, gallery, [2], two_matches)[2] == pytest.approx(chance([True, True, False], 2))
