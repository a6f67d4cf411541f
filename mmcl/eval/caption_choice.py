"""Caption choice (SugarCrepe's and ARO's task): does an image score its true caption above wrong ones?

A sample holds an image (or an audio clip), K true captions and H wrong ones (the dataset layout:
datasets.py). Every true caption is one trial, won when it scores above each of its sample's wrong
captions; the accuracy is the share of trials won. A tie is broken at random in expectation, as
recall@k breaks them (metrics.py): with no wrong caption above the true one and t tying with it, the
trial counts 1 / (t + 1). So a model that cannot tell the captions apart at all, a bag of words facing
an order swap, scores what chance gives (1/2 against one wrong caption), neither 0 nor 1.
CLIP_benchmark's image_caption_selection takes the argmax with the true caption first, which counts
ties as wins; without ties the two agree (tests/eval/test_caption_choice.py).
"""

from __future__ import annotations

import torch

# The evaluation input holding each sample's wrong captions, embedded by the text tower.
WRONG_CAPTIONS = "text.wrong"


def caption_choice_accuracy(
    query_emb: torch.Tensor,
    true_emb: torch.Tensor,
    true_counts: torch.Tensor,
    wrong_emb: torch.Tensor,
    wrong_counts: torch.Tensor,
) -> float:
    """query_emb (N, D): one row per sample; true_emb (T, D) and wrong_emb (W, D): the samples' captions in
    sample order, true_counts and wrong_counts (N,) how many each sample has."""
    samples = len(query_emb)
    true_owner = torch.repeat_interleave(torch.arange(samples), true_counts)  # (T,)
    wrong_owner = torch.repeat_interleave(torch.arange(samples), wrong_counts)  # (W,)
    true_scores = (query_emb[true_owner] * true_emb).sum(dim=1)  # (T, D) . (T, D) -> (T,)
    wrong_scores = (query_emb[wrong_owner] * wrong_emb).sum(dim=1)  # (W, D) . (W, D) -> (W,)
    # Each sample's wrong-caption scores in one row, padded with -inf (never above or tied with a score).
    widest = int(wrong_counts.max()) if samples else 0
    padded = torch.full((samples, widest), float("-inf"), dtype=wrong_scores.dtype)  # (N, Hmax)
    column = torch.arange(len(wrong_owner)) - (torch.cumsum(wrong_counts, 0) - wrong_counts)[wrong_owner]  # (W,)
    padded[wrong_owner, column] = wrong_scores
    rivals = padded[true_owner]  # (T, Hmax): the wrong captions each true caption faces
    ahead = (rivals > true_scores[:, None]).sum(dim=1)  # (T,)
    tied = (rivals == true_scores[:, None]).sum(dim=1)  # (T,)
    won = torch.where(ahead > 0, 0.0, 1.0 / (tied + 1).double())  # (T,)
    return won.mean().item() if len(won) else float("nan")
