"""Views of one modality as positives of each other (loss.view_weight, SLIP's image-image term): SupCon over
each modality's K views beside the cross-modal multi-positive loss, SimCLR's NT-Xent at K = 2, with
explicit negatives and presence masks, against the slow references."""

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import LossConfig
from mmcl.losses import build_loss

import reference

BATCH, K, D = 6, 3, 8
SCALE = torch.tensor(7.0, dtype=torch.float64)


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def view_loss(**settings):
    return build_loss(LossConfig(name="multi_positive", **{"view_weight": 0.7, "view_temperature": 0.2, **settings}))


@pytest.mark.parametrize("aggregation", ["geometric", "arithmetic"])
def test_the_view_term_is_supcon_over_each_modalitys_views(aggregation):
    image, text = unit(BATCH, K, D, seed=0), unit(BATCH, 2, D, seed=1)  # K image views, 2 captions
    out = view_loss(positive_aggregation=aggregation)({"image": image, "text": text}, SCALE)
    expected = {
        "image-text": reference.multi_positive(image, text, SCALE, aggregation),
        "image-image": reference.supcon(image, 1 / 0.2, aggregation),
        "text-text": reference.supcon(text, 1 / 0.2, aggregation),
    }
    assert out.keys() == {"loss", *expected}
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=1e-10, atol=0, msg=name)
    total = expected["image-text"] + 0.7 * (expected["image-image"] + expected["text-text"])
    torch.testing.assert_close(out["loss"], total, rtol=1e-10, atol=0)
    plain = view_loss(positive_aggregation=aggregation, view_weight=0.0)({"image": image, "text": text}, SCALE)
    assert plain.keys() == {"loss", "image-text"}  # off: views are positives of the other modality only
    torch.testing.assert_close(plain["loss"], expected["image-text"], rtol=1e-10, atol=0)


def test_at_two_views_the_term_is_simclrs_nt_xent():
    image, text = unit(BATCH, 2, D, seed=2), unit(BATCH, D, seed=3)
    out = view_loss()({"image": image, "text": text}, SCALE)
    torch.testing.assert_close(
        out["image-image"], reference.nt_xent(image[:, 0], image[:, 1], 1 / 0.2), rtol=1e-10, atol=0
    )


def test_explicit_negatives_and_presence_masks():
    image, text = unit(BATCH, K, D, seed=4), unit(BATCH, D, seed=5)
    negatives = unit(BATCH, 2, D, seed=6)  # two hard negative images per sample
    present = torch.tensor([True, False, True, True, False, True])
    out = view_loss()({"image": image, "text": text}, SCALE, negatives={"image": negatives})
    extra = negatives.flatten(0, 1)
    torch.testing.assert_close(out["image-image"], reference.supcon(image, 5.0, extra=extra), rtol=1e-10, atol=0)
    kept = view_loss()({"image": image, "text": text}, SCALE, present={"image": present})
    torch.testing.assert_close(kept["image-image"], reference.supcon(image[present], 5.0), rtol=1e-10, atol=0)
