"""Across 2 and 4 gloo processes every loss equals the single-process loss on the concatenated batch,
and gradients on every input equal its gradients (after data-parallel averaging); open_clip's
ClipLoss and SigLipLoss in their distributed modes agree with mmcl's on every rank."""

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmcl.config import LossConfig
from mmcl.losses import build_loss

from launch import free_port

PER_RANK = 3  # samples per process
DIM = 6
SEED = 5  # the step's seed: losses that sample negatives (Symile's O(N) shuffles) draw the same on every process

CASES = [
    ("infonce", {}, {}),
    ("infonce", {"label_smoothing": 0.1}, {}),
    ("infonce_tiled", {"chunk_size": 2}, {}),
    ("infonce_tiled", {"chunk_size": 2}, {"negatives": 2}),
    ("infonce", {}, {"negatives": 2}),
    ("siglip", {"siglip_exchange": "gather"}, {"bias": True}),
    ("siglip", {"siglip_exchange": "ring"}, {"bias": True}),
    ("dcl", {}, {}),
    ("hn_nce", {"alpha": 0.5, "beta": 1.0}, {}),
    ("hcl", {"beta": 0.5, "tau_plus": 0.1}, {}),
    ("multi_positive", {"positive_aggregation": "geometric"}, {"views": (2, 3)}),
    ("multi_positive", {"positive_aggregation": "arithmetic"}, {"views": (3, 1)}),
    ("symile", {"symile_negatives": "n"}, {"modalities": 3}),
    ("symile", {"symile_negatives": "n_squared"}, {"modalities": 3}),
    ("symile", {"symile_negatives": "n_squared"}, {"modalities": 4}),
    ("symile", {"symile_negatives": "n"}, {"modalities": 4}),
    ("infonce", {"same_modality_negatives": True}, {}),
    ("dcl", {"same_modality_negatives": True}, {}),
    ("hcl", {"beta": 0.5, "tau_plus": 0.1, "same_modality_negatives": True}, {"negatives": 2}),
    ("infonce", {"anchor": "image", "pair_weights": {"image-audio": 0.5}}, {"modalities": 3}),
    # Samples lacking a modality (process 0 holds no audio at all): each pair over the samples with both.
    ("infonce", {}, {"modalities": 3, "missing": True}),
    ("hn_nce", {"alpha": 0.5, "beta": 1.0}, {"modalities": 3, "missing": True}),
    ("siglip", {"siglip_exchange": "gather"}, {"modalities": 3, "missing": True, "bias": True}),
    ("multi_positive", {}, {"modalities": 3, "missing": True, "views": (2, 1)}),
]


def presence(n):
    """image missing on every third sample, audio on none of the first process's and on 3 in 4 after."""
    index = torch.arange(n)
    return {"image": index % 3 != 2, "audio": (index >= PER_RANK) & (index % 4 != 1)}


def case_inputs(case_index, world):
    """The full (global) batch of a case, identical in every process."""
    name, _, shape = CASES[case_index]
    # Cases of one loss and input shape share their data, so their exchanges can be compared.
    first = min(i for i, (n, _, sh) in enumerate(CASES) if n == name and sh == shape)
    g = torch.Generator().manual_seed(1000 + first)
    n = PER_RANK * world
    names = ["image", "text", "audio", "depth"][: shape.get("modalities", 2)]
    views = shape.get("views", (None, None))
    embeddings = {}
    for m, k in zip(names, list(views) + [None] * 3, strict=False):
        size = (n, k, DIM) if k else (n, DIM)
        embeddings[m] = F.normalize(torch.randn(*size, generator=g, dtype=torch.float64), dim=-1)
    negatives = {}
    if shape.get("negatives"):
        negatives["text"] = F.normalize(
            torch.randn(n, shape["negatives"], DIM, generator=g, dtype=torch.float64), dim=-1
        )
    scale = torch.tensor(7.5, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64) if shape.get("bias") else None
    present = presence(n) if shape.get("missing") else {}
    return embeddings, negatives, scale, bias, present


def loss_and_grads(case_index, embeddings, negatives, scale, bias, present):
    name, options, _ = CASES[case_index]
    leaves = {
        **{f"emb:{k}": v for k, v in embeddings.items()},
        **{f"neg:{k}": v for k, v in negatives.items()},
        "scale": scale,
        **({"bias": bias} if bias is not None else {}),
    }
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    out = build_loss(LossConfig(name=name, **options))(
        {k[4:]: v for k, v in leaves.items() if k.startswith("emb:")},
        leaves["scale"],
        leaves.get("bias"),
        {k[4:]: v for k, v in leaves.items() if k.startswith("neg:")} or None,
        present or None,
        seed=SEED,
    )
    grads = torch.autograd.grad(out["loss"], list(leaves.values()))
    return out["loss"].detach(), dict(zip(leaves, grads, strict=False))


def local_slice(tensor, rank):
    return tensor[rank * PER_RANK : (rank + 1) * PER_RANK]


def open_clip_results(rank, world):
    """open_clip's losses in each distributed mode, on this rank's share of case 0 (InfoNCE) and 5 (SigLIP)."""
    results = {}
    for local_loss in (True, False):
        emb, _, scale, _, _ = case_inputs(0, world)
        a = local_slice(emb["image"], rank).clone().requires_grad_(True)
        b = local_slice(emb["text"], rank).clone().requires_grad_(True)
        loss = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)(a, b, scale)
        results[f"clip_local={local_loss}"] = (loss.detach(), torch.autograd.grad(loss, (a, b)))
    for impl in ("bidir", "shift", "reduce", "gather"):
        emb, _, scale, bias, _ = case_inputs(5, world)
        a = local_slice(emb["image"], rank).clone().requires_grad_(True)
        b = local_slice(emb["text"], rank).clone().requires_grad_(True)
        loss = SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(a, b, scale, bias)
        results[f"siglip_{impl}"] = (loss.detach(), torch.autograd.grad(loss, (a, b)))
    return results


def worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for index in range(len(CASES)):
            embeddings, negatives, scale, bias, present = case_inputs(index, world)
            local = lambda tensors: {k: local_slice(v, rank) for k, v in tensors.items()}  # noqa: E731
            results[index] = loss_and_grads(index, local(embeddings), local(negatives), scale, bias, local(present))
        results["open_clip"] = open_clip_results(rank, world)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def distributed_results(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, start_method="fork")
    return world, [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_and_gradients_equal_single_process(distributed_results, index):
    world, per_rank = distributed_results
    embeddings, negatives, scale, bias, present = case_inputs(index, world)
    single_loss, single_grads = loss_and_grads(index, embeddings, negatives, scale, bias, present)

    mean_loss = sum(results[index][0] for results in per_rank) / world
    torch.testing.assert_close(mean_loss, single_loss, rtol=1e-10, atol=1e-12)
    for name, single_grad in single_grads.items():
        if name in ("scale", "bias"):  # replicated parameters: data parallelism averages their gradients
            averaged = sum(results[index][1][name] for results in per_rank) / world
            torch.testing.assert_close(averaged, single_grad, rtol=1e-9, atol=1e-12)
        else:  # the gather's backward already summed every process's share onto the owner's rows
            for rank, results in enumerate(per_rank):
                torch.testing.assert_close(
                    results[index][1][name] / world, local_slice(single_grad, rank), rtol=1e-9, atol=1e-12
                )


@pytest.mark.parametrize("mode", ["clip_local=True", "clip_local=False"])
def test_infonce_matches_open_clip_distributed(distributed_results, mode):
    world, per_rank = distributed_results
    for _rank, results in enumerate(per_rank):
        theirs_loss, theirs_grads = results["open_clip"][mode]
        ours_loss, ours_grads = results[0]
        if mode == "clip_local=True":  # both compute this rank's rows
            torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-10, atol=0)
        else:  # open_clip computes the whole global loss on every rank
            torch.testing.assert_close(sum(r[0][0] for r in per_rank) / world, theirs_loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(ours_grads["emb:image"], theirs_grads[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours_grads["emb:text"], theirs_grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["bidir", "shift", "reduce", "gather"])
@pytest.mark.parametrize("ours", [5, 6], ids=["gather", "ring"])
def test_siglip_matches_open_clip_distributed(distributed_results, impl, ours):
    world, per_rank = distributed_results
    for results in per_rank:
        theirs_loss, theirs_grads = results["open_clip"][f"siglip_{impl}"]
        ours_loss, ours_grads = results[ours]
        torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(ours_grads["emb:image"], theirs_grads[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours_grads["emb:text"], theirs_grads[1], rtol=1e-9, atol=1e-12)
