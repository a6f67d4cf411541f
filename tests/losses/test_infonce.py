"""InfoNCE against open_clip's ClipLoss and against a slow loop written from the CLIP paper."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mmcl.losses import infonce_loss

from conftest import unit


def reference_infonce(a, b, scale):
    """CLIP's symmetric loss, one row at a time: -log softmax of the matching pair, both directions."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * (a[i] @ b[j]) for j in range(n)]
        col = [scale * (b[i] @ a[j]) for j in range(n)]
        total = (
            total - (row[i] - torch.logsumexp(torch.stack(row), 0)) - (col[i] - torch.logsumexp(torch.stack(col), 0))
        )
    return total / (2 * n)


@pytest.mark.parametrize("n, d, temperature", [(1, 4, 0.07), (8, 16, 0.07), (33, 7, 1.0), (64, 32, 0.01)])
def test_matches_open_clip_clip_loss(n, d, temperature):
    a, b = unit(n, d, seed=0), unit(n, d, seed=1)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    scale = torch.tensor(1 / temperature, dtype=torch.float64)
    ours = infonce_loss(a, b, scale)
    theirs = ClipLoss()(a2, b2, scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, d, temperature", [(2, 3, 0.5), (9, 5, 0.07)])
def test_matches_slow_reference_forward_and_backward(n, d, temperature):
    a, b = unit(n, d, seed=2), unit(n, d, seed=3)
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    fast = infonce_loss(a, b, scale)
    grads_fast = torch.autograd.grad(fast, (a, b, scale))
    slow = reference_infonce(a, b, scale)
    grads_slow = torch.autograd.grad(slow, (a, b, scale))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=0)
    for g_fast, g_slow in zip(grads_fast, grads_slow, strict=False):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-12)


def test_perfect_alignment_loss_approaches_zero_and_random_is_log_n():
    a = unit(16, 64, seed=4)
    assert infonce_loss(a, a, torch.tensor(1000.0, dtype=torch.float64)).item() < 1e-6
    assert infonce_loss(a, a, torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(math.log(16))


def test_label_smoothing_matches_cross_entropy_definition():
    a, b = unit(5, 4, seed=8), unit(5, 4, seed=9)
    scale = torch.tensor(3.0, dtype=torch.float64)
    logits = scale * a @ b.T
    labels = torch.arange(5)
    expected = (
        F.cross_entropy(logits, labels, label_smoothing=0.1) + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(infonce_loss(a, b, scale, label_smoothing=0.1), expected)
