"""Calibration-baseline losses: hand-computed values on tiny tensors, the two-class mapping, and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, NACLLoss

from scripts.calibration_losses import (
    LabelSmoothingDiceBCELoss,
    MarginLabelSmoothingLoss,
    NeighbourAwareDiceCELoss,
    smooth_binary_targets,
    two_class_logits,
)

SMOOTH = 1e-5  # MONAI DiceLoss default smooth_nr and smooth_dr


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _batch_dice_loss(probabilities: list[float], targets: list[float]) -> float:
    intersection = sum(p * y for p, y in zip(probabilities, targets))
    return 1.0 - (2.0 * intersection + SMOOTH) / (sum(probabilities) + sum(targets) + SMOOTH)


def test_smoothed_targets_by_hand():
    smoothed = smooth_binary_targets(torch.tensor([0.0, 1.0]), 0.2)
    assert smoothed.tolist() == pytest.approx([0.1, 0.9])


def test_label_smoothing_value_by_hand():
    logits = torch.tensor([2.0, -1.0]).view(1, 1, 2, 1)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    loss = LabelSmoothingDiceBCELoss(smoothing=0.2)(logits, target)
    # BCE(z, t) = t softplus(-z) + (1 - t) softplus(z), targets 0.9 and 0.1.
    bce = (0.9 * _softplus(-2.0) + 0.1 * _softplus(2.0) + 0.1 * _softplus(1.0) + 0.9 * _softplus(-1.0)) / 2
    dice = _batch_dice_loss([_sigmoid(2.0), _sigmoid(-1.0)], [1.0, 0.0])
    assert float(loss) == pytest.approx(bce + dice, rel=1e-6)


def test_label_smoothing_matches_two_class_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 4, 5, generator=generator) * 3
    target = (torch.rand(3, 1, 4, 5, generator=generator) > 0.5).float()
    ours = LabelSmoothingDiceBCELoss(smoothing=0.3)(logits, target) - DiceCELoss(sigmoid=True, batch=True).dice(
        logits, target
    )
    # Independent implementation: PyTorch's softmax cross-entropy with label smoothing on the logits (0, z).
    softmax_smoothed = F.cross_entropy(two_class_logits(logits[:, 0]), target[:, 0].long(), label_smoothing=0.3)
    assert float(ours) == pytest.approx(float(softmax_smoothed), rel=1e-5)


def test_monai_dicece_ignores_smoothing_for_sigmoid():
    # The reason for the wrapper: with one sigmoid channel MONAI 1.6.1's DiceCELoss uses unsmoothed BCE.
    logits = torch.tensor([2.0, -1.0]).view(1, 1, 2, 1)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    smoothed = DiceCELoss(sigmoid=True, batch=True, label_smoothing=0.2)(logits, target)
    plain = DiceCELoss(sigmoid=True, batch=True)(logits, target)
    ours = LabelSmoothingDiceBCELoss(smoothing=0.2)(logits, target)
    assert float(smoothed) == pytest.approx(float(plain))
    assert float(ours) != pytest.approx(float(plain))


def test_margin_penalty_by_hand():
    logits = torch.tensor([12.0, -15.0, 3.0, 0.0]).view(1, 1, 4, 1)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 4, 1)
    loss = MarginLabelSmoothingLoss(margin=10.0, weight=0.1)(logits, target)
    base = DiceCELoss(sigmoid=True, batch=True)(logits, target)
    # relu(|z| - 10) = 2, 5, 0, 0; mean 7 / 4; times 0.1.
    assert float(loss - base) == pytest.approx(0.175, rel=1e-5)


def test_margin_penalty_zero_inside_margin():
    logits = torch.linspace(-9.9, 9.9, 12).view(1, 1, 3, 4)
    target = (logits > 0).float()
    loss = MarginLabelSmoothingLoss()(logits, target)
    assert float(loss) == pytest.approx(float(DiceCELoss(sigmoid=True, batch=True)(logits, target)))


def test_two_class_mapping_softmax_is_sigmoid():
    logits = torch.tensor([-3.0, 0.0, 0.7, 5.0])
    probabilities = torch.softmax(two_class_logits(logits), dim=1)
    assert torch.allclose(probabilities[:, 1], torch.sigmoid(logits))
    assert torch.allclose(probabilities[:, 0], 1 - torch.sigmoid(logits))


def test_nacl_cross_entropy_equals_bce():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=generator) * 4
    target = (torch.rand(2, 6, 7, generator=generator) > 0.4).long()
    nacl_without_constraint = NACLLoss(classes=2, dim=2, alpha=0.0)(two_class_logits(logits), target)
    bce = F.binary_cross_entropy_with_logits(logits, target.float())
    assert float(nacl_without_constraint) == pytest.approx(float(bce), rel=1e-5)


def test_nacl_value_by_hand():
    # One 3 x 3 slice, target all foreground, every logit 0.5. The zero-padded 3 x 3 mean filter of the one-hot
    # foreground gives 1 at the centre, 6/9 at edges and 4/9 at corners. The background channel and its logit are 0.
    # L1 over 2 classes x 9 voxels: (|1 - 0.5| + 4 |2/3 - 0.5| + 4 |4/9 - 0.5|) / 18 = 25 / 324.
    logits = torch.full((1, 1, 3, 3), 0.5)
    target = torch.ones(1, 1, 3, 3)
    loss = NeighbourAwareDiceCELoss(kernel_size=3, alpha=0.1)(logits, target)
    dice = _batch_dice_loss([_sigmoid(0.5)] * 9, [1.0] * 9)
    expected = dice + _softplus(-0.5) + 0.1 * 25 / 324
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_nacl_averages_channels():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, 5, generator=generator)
    target = (torch.rand(2, 3, 5, 5, generator=generator) > 0.5).float()
    loss = NeighbourAwareDiceCELoss()
    per_channel = [NACLLoss(classes=2, dim=2)(two_class_logits(logits[:, k]), target[:, k].long()) for k in range(3)]
    expected = sum(float(v) for v in per_channel) / 3
    assert float(loss.neighbour_aware_ce(logits, target)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [LabelSmoothingDiceBCELoss(), MarginLabelSmoothingLoss(margin=1.0), NeighbourAwareDiceCELoss()],
    ids=["label_smoothing", "mbls", "nacl"],
)
def test_gradients_finite_nonzero(loss):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 1, 8, 8, generator=generator) * 5).requires_grad_(True)
    target = (torch.rand(4, 1, 8, 8, generator=generator) > 0.5).float()
    value = loss(logits, target).mean()
    value.backward()
    assert value.ndim == 0
    assert torch.isfinite(logits.grad).all()
    assert float(logits.grad.abs().sum()) > 0


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="one shape"):
        LabelSmoothingDiceBCELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))
