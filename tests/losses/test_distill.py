"""The distillation term against a float64 loop reference transcribed from open_clip's DistillClipLoss
and against DistillClipLoss itself, forward and backward; on top of every loss; and on 2 gloo processes
equal to one process on the concatenated batch."""

import math

import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from mmcl import dist
from mmcl.config import LossConfig
from mmcl.losses import build_loss
from mmcl.losses.distill import DistillationLoss
from mmcl.models import Encoded

from launch import launch

BATCH, WIDTH, TEACHER_WIDTH = 6, 5, 7  # the teacher embeds in a space of its own width
STUDENT_SCALE, TEACHER_SCALE = 7.5, 12.0


def unit_rows(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=-1)


def inputs(modalities=("image", "text"), rows=BATCH):
    """Student embeddings (leaves with gradients), its scale (a leaf) and the teacher's Encoded."""
    student = {m: unit_rows(rows, WIDTH, seed=i).requires_grad_(True) for i, m in enumerate(modalities)}
    teacher = {m: unit_rows(rows, TEACHER_WIDTH, seed=100 + i) for i, m in enumerate(modalities)}
    scale = torch.tensor(STUDENT_SCALE, dtype=torch.float64, requires_grad=True)
    return student, scale, Encoded(teacher, torch.tensor(TEACHER_SCALE, dtype=torch.float64), None)


def reference_direction(s_x, s_y, s_scale, t_x, t_y, t_scale):
    """open_clip's DistillClipLoss.dist_loss, -(softmax(t) * log_softmax(s)).sum(1).mean(0), written out
    as loops over rows and columns of float64 scalars: logits[i][j] = scale * <x_i, y_j>."""
    n = len(s_x)
    total = 0.0
    for i in range(n):
        s_row = [s_scale * sum(s_x[i][k] * s_y[j][k] for k in range(len(s_x[i]))) for j in range(n)]
        t_row = [t_scale * sum(t_x[i][k] * t_y[j][k] for k in range(len(t_x[i]))) for j in range(n)]
        s_log_norm = torch.log(sum(torch.exp(v) for v in s_row))
        t_norm = sum(math.exp(float(v)) for v in t_row)
        total = total - sum((math.exp(float(t_row[j])) / t_norm) * (s_row[j] - s_log_norm) for j in range(n))
    return total / n


def reference_pair(student, scale, teacher, a, b):
    """The mean of the two directions, as DistillClipLoss averages image->text and text->image."""
    t = teacher.embeddings
    a_to_b = reference_direction(student[a], student[b], scale, t[a], t[b], teacher.logit_scale)
    b_to_a = reference_direction(student[b], student[a], scale, t[b], t[a], teacher.logit_scale)
    return (a_to_b + b_to_a) / 2


def grads(value, leaves):
    return torch.autograd.grad(value, leaves, allow_unused=True)


def test_term_equals_the_loop_reference_forward_and_backward():
    student, scale, teacher = inputs()
    out = DistillationLoss(build_loss(LossConfig()), weight=1.0)(student, scale, teacher=teacher)
    reference = reference_pair(student, scale, teacher, "image", "text")
    torch.testing.assert_close(out["distill"], reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["distill_image-text"], reference, rtol=1e-12, atol=0)
    leaves = [student["image"], student["text"], scale]
    for ours, theirs in zip(grads(out["distill"], leaves), grads(reference, leaves), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    assert out["distill"] > 0.5  # the two models disagree: a term far from zero, which the comparison pins


def test_total_equals_open_clip_distill_clip_loss():
    student, scale, teacher = inputs()
    out = DistillationLoss(build_loss(LossConfig()), weight=1.0)(student, scale, teacher=teacher)
    contrastive, distill = DistillClipLoss()(
        student["image"], student["text"], scale, teacher.embeddings["image"], teacher.embeddings["text"], 12.0
    )
    torch.testing.assert_close(out["contrastive"], contrastive, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["distill"], distill, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["loss"], contrastive + distill, rtol=1e-12, atol=0)
    leaves = [student["image"], student["text"], scale]
    for ours, theirs in zip(grads(out["loss"], leaves), grads(contrastive + distill, leaves), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)


LOSSES = [
    ("infonce", {}, ("image", "text")),
    ("infonce_tiled", {"chunk_size": 4}, ("image", "text")),
    ("siglip", {}, ("image", "text")),
    ("dcl", {"same_modality_negatives": True}, ("image", "text")),
    ("hn_nce", {"alpha": 0.5, "beta": 1.0}, ("image", "text")),
    ("hcl", {}, ("image", "text")),
    ("multi_positive", {}, ("image", "text")),
    ("symile", {}, ("audio", "image", "text")),
    ("infonce", {"anchor": "image", "pair_weights": {"image-audio": 0.5}}, ("audio", "image", "text")),
]


@pytest.mark.parametrize("name, options, modalities", LOSSES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LOSSES)])
def test_adds_weight_times_the_reference_to_every_loss(name, options, modalities):
    cfg = LossConfig(name=name, **options)
    student, scale, teacher = inputs(modalities)
    bias = torch.tensor(-2.0, dtype=torch.float64) if name == "siglip" else None
    out = DistillationLoss(build_loss(cfg), weight=0.7)(student, scale, bias, teacher=teacher)
    alone = build_loss(cfg)(student, scale, bias)
    pairs = build_loss(cfg).pairs(list(modalities))
    assert len(pairs) == (1 if len(modalities) == 2 else 2 if options.get("anchor") else 3)
    distill = sum(w * reference_pair(student, scale, teacher, a, b) for a, b, w in pairs)
    torch.testing.assert_close(out["contrastive"], alone["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out["distill"], distill, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["loss"], alone["loss"] + 0.7 * distill, rtol=1e-12, atol=0)
    leaves = [*student.values(), scale]
    expected = [g_a + 0.7 * g_d for g_a, g_d in zip(grads(alone["loss"], leaves), grads(distill, leaves), strict=True)]
    for ours, theirs in zip(grads(out["loss"], leaves), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)


PER_RANK = 3


def distributed_worker(rank, world, out_dir):
    dist.init_from_env(torch.device("cpu"))
    student, scale, teacher = inputs(rows=PER_RANK * world)
    local = {m: e[rank * PER_RANK : (rank + 1) * PER_RANK].detach().requires_grad_(True) for m, e in student.items()}
    local_teacher = Encoded(
        {m: e[rank * PER_RANK : (rank + 1) * PER_RANK] for m, e in teacher.embeddings.items()}, *teacher[1:]
    )
    out = DistillationLoss(build_loss(LossConfig()), weight=0.7)(local, scale, teacher=local_teacher)
    leaves = [local["image"], local["text"], scale]
    torch.save({"loss": out["loss"].detach(), "grads": grads(out["loss"], leaves)}, out_dir / f"{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    launch(distributed_worker, 2, tmp_path)
    per_rank = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    student, scale, teacher = inputs(rows=PER_RANK * 2)
    out = DistillationLoss(build_loss(LossConfig()), weight=0.7)(student, scale, teacher=teacher)
    single = grads(out["loss"], [student["image"], student["text"], scale])
    # Each process's value is its share: their mean is the loss of the whole batch.
    torch.testing.assert_close(
        (per_rank[0]["loss"] + per_rank[1]["loss"]) / 2, out["loss"].detach(), rtol=1e-12, atol=0
    )
    for rank, result in enumerate(per_rank):
        for index in (0, 1):  # the gather's backward summed every process's share onto the owner's rows
            rows = single[index][rank * PER_RANK : (rank + 1) * PER_RANK]
            torch.testing.assert_close(result["grads"][index] / 2, rows, rtol=1e-10, atol=1e-13)
    # The scale is replicated: data parallelism averages its gradients.
    torch.testing.assert_close(
        (per_rank[0]["grads"][2] + per_rank[1]["grads"][2]) / 2, single[2], rtol=1e-10, atol=1e-13
    )


def test_without_the_teacher_s_embeddings_it_refuses():
    student, scale, _ = inputs()
    with pytest.raises(ValueError, match="teacher"):
        DistillationLoss(build_loss(LossConfig()), weight=1.0)(student, scale)
