"""Every fast loss equals its slow reference (tests/losses/reference.py), forward and backward, in float64."""

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import LossConfig
from mmcl.errors import ConfigError
from mmcl.losses import build_loss, infonce_loss

import reference
from conftest import unit

GRID = [(2, 3, 1.0), (5, 8, 0.07), (12, 4, 0.3), (17, 16, 0.01)]  # (batch, dim, temperature)


def assert_same_loss_and_grads(fast, slow, inputs, rtol=1e-5):
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=1e-12)
    fast_grads = torch.autograd.grad(fast, inputs)
    slow_grads = torch.autograd.grad(slow, inputs)
    for g_fast, g_slow in zip(fast_grads, slow_grads, strict=False):
        torch.testing.assert_close(g_fast, g_slow, rtol=rtol, atol=1e-10)


def scale_for(temperature):
    return torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("n, d, t", GRID)
@pytest.mark.parametrize(
    "name, options, slow",
    [
        ("infonce", {}, lambda a, b, s: reference.infonce(a, b, s)),
        ("infonce", {"label_smoothing": 0.1}, lambda a, b, s: reference.infonce(a, b, s, 0.1)),
        ("infonce_tiled", {"chunk_size": 3}, lambda a, b, s: reference.infonce(a, b, s)),
        ("infonce_tiled", {"chunk_size": 4, "label_smoothing": 0.2}, lambda a, b, s: reference.infonce(a, b, s, 0.2)),
        ("dcl", {}, reference.dcl),
        ("hn_nce", {"alpha": 0.7, "beta": 0.5}, lambda a, b, s: reference.hn_nce(a, b, s, 0.7, 0.5)),
        ("hn_nce", {"alpha": 0.0, "beta": 2.0}, lambda a, b, s: reference.hn_nce(a, b, s, 0.0, 2.0)),
        ("hcl", {"beta": 0.5, "tau_plus": 0.1}, lambda a, b, s: reference.hcl(a, b, s, 0.5, 0.1)),
        ("hcl", {"beta": 1.0, "tau_plus": 0.0}, lambda a, b, s: reference.hcl(a, b, s, 1.0, 0.0)),
        # The papers' SimCLR form: both modalities of every other sample are negatives (2B - 2 of them).
        ("infonce", {"same_modality_negatives": True}, reference.nt_xent),
        ("dcl", {"same_modality_negatives": True}, lambda a, b, s: reference.dcl(a, b, s, same_modality=True)),
        (
            "hcl",
            {"beta": 0.5, "tau_plus": 0.1, "same_modality_negatives": True},
            lambda a, b, s: reference.hcl(a, b, s, 0.5, 0.1, same_modality=True),
        ),
    ],
)
def test_pairwise_losses_match_reference(name, options, slow, n, d, t):
    a, b, scale = unit(n, d, seed=n), unit(n, d, seed=n + 100), scale_for(t)
    fast = build_loss(LossConfig(name=name, **options))({"image": a, "text": b}, scale)
    assert set(fast) == {"loss", "image-text"}
    assert_same_loss_and_grads(fast["loss"], slow(a, b, scale), (a, b, scale))


@pytest.mark.parametrize("n, d, t", GRID)
def test_siglip_matches_reference(n, d, t):
    a, b, scale = unit(n, d, seed=1), unit(n, d, seed=2), scale_for(t)
    bias = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    fast = build_loss(LossConfig(name="siglip"))({"image": a, "text": b}, scale, bias)["loss"]
    assert_same_loss_and_grads(fast, reference.siglip(a, b, scale, bias), (a, b, scale, bias))


@pytest.mark.parametrize(
    "n, ka, kb, d, t", [(3, 2, 1, 4, 0.1), (4, 3, 2, 6, 0.5), (5, 1, 4, 8, 0.05), (2, 2, 2, 3, 1.0)]
)
@pytest.mark.parametrize("aggregation", ["geometric", "arithmetic"])
def test_multi_positive_matches_reference(aggregation, n, ka, kb, d, t):
    a, b, scale = unit(n, ka, d, seed=3), unit(n, kb, d, seed=4), scale_for(t)
    loss = build_loss(LossConfig(name="multi_positive", positive_aggregation=aggregation))
    fast = loss({"image": a, "text": b}, scale)["loss"]
    assert_same_loss_and_grads(fast, reference.multi_positive(a, b, scale, aggregation), (a, b, scale))


@pytest.mark.parametrize("aggregation", ["geometric", "arithmetic"])
def test_multi_positive_with_one_view_is_infonce(aggregation):
    a, b, scale = unit(6, 5, seed=5), unit(6, 5, seed=6), scale_for(0.1)
    loss = build_loss(LossConfig(name="multi_positive", positive_aggregation=aggregation))
    torch.testing.assert_close(loss({"image": a, "text": b}, scale)["loss"], infonce_loss(a, b, scale))


def symile_permutations(embeddings, seed):
    """The shuffles Symile's O(N) sampling draws, as mmcl documents them: one generator seeded with the
    step's seed; for each anchor modality in sorted order, one permutation of the (global) rows of each
    other modality in sorted order."""
    names = sorted(embeddings)
    n = len(embeddings[names[0]])
    generator = torch.Generator().manual_seed(seed)
    return {
        anchor: {m: torch.randperm(n, generator=generator).tolist() for m in names if m != anchor} for anchor in names
    }


@pytest.mark.parametrize("n, d, t", [(3, 4, 0.1), (5, 8, 0.5), (6, 5, 1.0)])
@pytest.mark.parametrize("modalities", [3, 4])
def test_symile_n_squared_matches_the_paper(modalities, n, d, t):
    embeddings = {f"m{k}": unit(n, d, seed=10 + k) for k in range(modalities)}
    scale = scale_for(t)
    fast = build_loss(LossConfig(name="symile", symile_negatives="n_squared"))(embeddings, scale)["loss"]
    slow = reference.symile(embeddings, scale, "n_squared")
    assert_same_loss_and_grads(fast, slow, (*embeddings.values(), scale), rtol=1e-6)


@pytest.mark.parametrize("n, d, t", [(3, 4, 0.1), (6, 8, 0.5), (9, 5, 1.0)])
@pytest.mark.parametrize("modalities", [3, 4])
def test_symile_n_matches_the_paper_with_the_same_shuffles(modalities, n, d, t):
    embeddings = {f"m{k}": unit(n, d, seed=20 + k) for k in range(modalities)}
    scale = scale_for(t)
    loss = build_loss(LossConfig(name="symile", symile_negatives="n"))
    fast = loss(embeddings, scale, seed=11)["loss"]
    slow = reference.symile(embeddings, scale, "n", symile_permutations(embeddings, 11))
    assert_same_loss_and_grads(fast, slow, (*embeddings.values(), scale), rtol=1e-6)
    assert loss(embeddings, scale, seed=12)["loss"] != fast  # the step's seed draws the shuffles


def test_symile_defaults_to_the_authors_o_n_sampling():
    assert LossConfig().symile_negatives == "n"


@pytest.mark.parametrize(
    "name, options",
    [
        ("infonce", {}),
        ("infonce_tiled", {}),
        ("dcl", {}),
        ("hn_nce", {}),
        ("hcl", {}),
        ("siglip", {}),
        ("multi_positive", {}),
        ("dcl", {"same_modality_negatives": True}),
    ],
)
def test_a_batch_without_negatives_stops_with_a_clear_error(name, options):
    a, b = unit(1, 4, seed=60), unit(1, 4, seed=61)
    with pytest.raises(ConfigError, match=rf"loss '{name}'.*batch of 1"):
        build_loss(LossConfig(name=name, **options))({"image": a, "text": b}, scale_for(0.1))


def test_a_batch_of_one_is_scored_when_both_modalities_bring_hard_negatives():
    a, b, scale = unit(1, 4, seed=62), unit(1, 4, seed=63), scale_for(0.1)
    both = {"image": unit(1, 2, 4, seed=64), "text": unit(1, 2, 4, seed=65)}
    for name in ("infonce", "dcl", "hcl", "hn_nce", "multi_positive"):
        out = build_loss(LossConfig(name=name))({"image": a, "text": b}, scale, negatives=both)
        assert torch.isfinite(out["loss"]), name
        with pytest.raises(ConfigError, match="batch of 1"):  # text -> image would have no negative
            build_loss(LossConfig(name=name))({"image": a, "text": b}, scale, negatives={"text": both["text"]})
    with pytest.raises(ConfigError, match=r"loss 'symile'.*batch of 1"):
        build_loss(LossConfig(name="symile"))({m: unit(1, 4, seed=i) for i, m in enumerate("xyz")}, scale)


def test_hcl_with_same_modality_negatives_is_stable_at_the_largest_scale_in_float32():
    """A regular tetrahedron: every cosine -1/3, so at scale 100 each anchor's own column (excluded)
    sits 133 above every logit that counts; the loss is log 3."""
    corners = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / 3**0.5
    loss = build_loss(LossConfig(name="hcl", beta=0.5, tau_plus=0.0, same_modality_negatives=True))
    out = loss({"image": corners[:2], "text": corners[2:]}, torch.tensor(100.0))["loss"]
    assert out.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)


def test_a_loss_refuses_settings_it_does_not_offer_when_built():
    with pytest.raises(ConfigError, match="loss.same_modality_negatives"):
        build_loss(LossConfig(name="siglip", same_modality_negatives=True))
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        build_loss(LossConfig(name="infonce", same_modality_negatives=True, label_smoothing=0.1))


@pytest.mark.parametrize("name", ["infonce", "infonce_tiled", "dcl", "hn_nce", "hcl", "multi_positive"])
def test_three_modalities_sum_pairs_with_weights(name):
    emb = {"audio": unit(5, 4, seed=20), "image": unit(5, 4, seed=21), "text": unit(5, 4, seed=22)}
    scale = scale_for(0.2)
    weights = {"audio-text": 0.5, "image-text": 2.0}
    loss = build_loss(LossConfig(name=name, pairs=["audio-text", "image-text"], pair_weights=weights))
    out = loss(emb, scale)
    single = build_loss(LossConfig(name=name))
    expected = sum(
        w * single({a: emb[a], b: emb[b]}, scale)["loss"]
        for (a, b), w in [(("audio", "text"), 0.5), (("image", "text"), 2.0)]
    )
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "audio-text", "image-text"}


def test_a_pair_weight_may_name_the_pair_either_way_round():
    emb = {"image": unit(4, 3, seed=33), "text": unit(4, 3, seed=34)}
    weighted = build_loss(LossConfig(name="infonce", pair_weights={"text-image": 2.0}))(emb, scale_for(0.5))
    plain = build_loss(LossConfig(name="infonce"))(emb, scale_for(0.5))
    torch.testing.assert_close(weighted["loss"], 2 * plain["loss"])


def test_anchor_modality_uses_only_its_pairs():
    emb = {"audio": unit(4, 3, seed=30), "image": unit(4, 3, seed=31), "text": unit(4, 3, seed=32)}
    out = build_loss(LossConfig(name="infonce", anchor="image"))(emb, scale_for(0.5))
    assert set(out) == {"loss", "image-audio", "image-text"}
    torch.testing.assert_close(out["loss"], out["image-audio"] + out["image-text"])


@pytest.mark.parametrize("name", ["infonce", "infonce_tiled", "multi_positive"])
def test_explicit_hard_negatives_are_extra_candidates(name):
    a, b, scale = unit(4, 6, seed=40), unit(4, 6, seed=41), scale_for(0.1)
    hard_b = unit(4, 2, 6, seed=42)  # two hard-negative captions per sample: (B, H, D)
    fast = build_loss(LossConfig(name=name, chunk_size=3))({"image": a, "text": b}, scale, negatives={"text": hard_b})
    slow = reference.infonce(a, b, scale, extra_b=hard_b.reshape(-1, 6))
    assert_same_loss_and_grads(fast["loss"], slow, (a, b, hard_b, scale))


def test_hn_nce_reduces_to_infonce():
    a, b, scale = unit(7, 5, seed=50), unit(7, 5, seed=51), scale_for(0.1)
    hn = build_loss(LossConfig(name="hn_nce", alpha=1.0, beta=0.0))({"image": a, "text": b}, scale)["loss"]
    torch.testing.assert_close(hn, infonce_loss(a, b, scale))


def test_hcl_is_stable_at_the_largest_scale_in_float32():
    a = F.normalize(torch.randn(64, 32), dim=-1)
    b = F.normalize(a + 0.1 * torch.randn(64, 32), dim=-1)
    out = build_loss(LossConfig(name="hcl"))({"image": a, "text": b}, torch.tensor(100.0))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    "name, options",
    [
        ("infonce", {}),
        ("infonce_tiled", {"chunk_size": 2}),
        ("dcl", {}),
        ("hcl", {"beta": 0.5, "tau_plus": 0.1}),
        ("siglip", {}),
        ("multi_positive", {}),
    ],
)
def test_missing_modalities_score_each_pair_over_the_samples_holding_both(name, options):
    """With `present` masks every pair's loss (and gradient) is the loss of the kept samples alone."""
    n = 9
    emb = {m: unit(n, 5, seed=i) for i, m in enumerate(["image", "text", "audio"])}
    scale, bias = scale_for(0.1), torch.tensor(-1.0, dtype=torch.float64)
    present = {"image": torch.arange(n) % 3 != 0, "audio": torch.arange(n) % 2 == 0}
    loss = build_loss(LossConfig(name=name, **options))
    out = loss(emb, scale, bias if name == "siglip" else None, present=present)
    for a, b in [("audio", "image"), ("audio", "text"), ("image", "text")]:
        rows = present.get(a, torch.ones(n, dtype=torch.bool)) & present.get(b, torch.ones(n, dtype=torch.bool))
        alone = loss({a: emb[a][rows], b: emb[b][rows]}, scale, bias if name == "siglip" else None)
        assert_same_loss_and_grads(out[f"{a}-{b}"], alone["loss"], (emb[a], emb[b], scale))


def test_a_pair_with_no_sample_holding_both_adds_nothing():
    emb = {m: unit(4, 5, seed=i) for i, m in enumerate(["image", "text", "audio"])}
    present = {"image": torch.tensor([True, True, False, False]), "audio": torch.tensor([False, False, True, True])}
    out = build_loss(LossConfig(name="infonce"))(emb, scale_for(0.1), present=present)
    assert out["audio-image"].item() == 0.0
    out["loss"].backward()
    assert emb["audio"].grad[:2].abs().max() == 0 and emb["image"].grad[2:].abs().max() == 0
