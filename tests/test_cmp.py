"""Tests of the confidence misalignment penalty: hand-computed values, properties and gradient signs."""

import math

import pytest
import torch

from scripts.cmp import CMPTerms, confidence_misalignment_penalty, confidence_misalignment_terms


def as_pairs(values) -> torch.Tensor:
    """Shape a flat list of voxel values as one pair ``(1, 1, 1, N)``."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_hand_computed_four_voxels():
    logits = as_pairs([2.0, -1.0, 0.5, -3.0])
    target = as_pairs([1.0, 1.0, 0.0, 0.0])
    roi = torch.ones_like(logits)
    # p = sigmoid(z) = 0.880797, 0.268941, 0.622459, 0.047426
    # c = max(p, 1 - p) = 0.880797, 0.731059, 0.622459, 0.952574
    # yhat = 1, 0, 1, 0, so e = 0, 1, 1, 0 and the accuracy is 0.5.
    # first term (tau 0.6, gamma 2): ((0.731059 - 0.6)^2 + (0.622459 - 0.6)^2) / 4 = 0.004420
    # gap: |(0.880797 + 0.731059 + 0.622459 + 0.952574) / 4 - 0.5| = 0.296722
    terms = confidence_misalignment_terms(logits, target, roi, tau=0.6, gamma=2.0)
    value = confidence_misalignment_penalty(logits, target, roi, tau=0.6, gamma=2.0, beta=0.5)

    assert isinstance(terms, CMPTerms)
    assert float(terms.confident_error) == pytest.approx(0.0044201931, rel=1e-5)
    assert float(terms.calibration_gap) == pytest.approx(0.2967222787, rel=1e-5)
    assert float(value) == pytest.approx(0.0044201931 + 0.5 * 0.2967222787, rel=1e-5)


def test_zero_for_perfect_confident_prediction():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    logits = 60.0 * target - 30.0  # +30 on foreground, -30 on background
    roi = torch.ones_like(target)

    # sigmoid(30) = 1 - 9.4e-14 rounds to 1 in float32, so both terms vanish up to rounding.
    value = confidence_misalignment_penalty(logits, target, roi)
    assert abs(float(value)) < 1e-6


def test_grows_with_confidence_of_wrong_voxel():
    target = as_pairs([1.0, 0.0, 1.0, 0.0])
    roi = torch.ones_like(target)
    previous_total, previous_first = -1.0, -1.0
    # Three correct voxels at confidence 0.88, and a wrong last voxel with a growing logit.
    for wrong_logit in [0.1, 0.5, 1.0, 2.0, 4.0, 8.0]:
        logits = as_pairs([2.0, -2.0, 2.0, wrong_logit])
        total = float(confidence_misalignment_penalty(logits, target, roi))
        first = float(confidence_misalignment_terms(logits, target, roi).confident_error)
        assert total > previous_total, wrong_logit
        assert first > previous_first, wrong_logit
        previous_total, previous_first = total, first


def test_first_term_gradient_signs():
    # Voxels: correct foreground, correct background, wrong foreground call, wrong background call,
    # and a wrong call below tau.
    logits = as_pairs([3.0, -3.0, 2.0, -2.0, 0.2]).requires_grad_(True)
    target = as_pairs([1.0, 0.0, 0.0, 1.0, 0.0])
    roi = torch.ones_like(target)

    terms = confidence_misalignment_terms(logits, target, roi, tau=0.6)
    (grad,) = torch.autograd.grad(terms.confident_error, logits)
    grad = grad.flatten()

    assert grad[0] == 0.0
    assert grad[1] == 0.0
    # Gradient descent moves a wrong positive logit down and a wrong negative logit up, toward p = 0.5.
    assert grad[2] > 0
    assert grad[3] < 0
    assert grad[4] == 0.0  # sigmoid(0.2) = 0.55 < tau


def test_roi_excludes_outside_voxels():
    logits = as_pairs([2.0, -1.0, 0.5, -3.0, 9.0, -9.0])
    target = as_pairs([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    roi = as_pairs([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])

    inside = confidence_misalignment_penalty(logits[..., :4], target[..., :4], roi[..., :4], tau=0.6, beta=0.5)
    masked = confidence_misalignment_penalty(logits, target, roi, tau=0.6, beta=0.5)
    assert float(masked) == pytest.approx(float(inside), rel=1e-6)
    assert float(masked) == pytest.approx(0.0044201931 + 0.5 * 0.2967222787, rel=1e-5)


def test_means_pool_all_pairs():
    logits = torch.tensor([[[[2.0, -1.0]]], [[[0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    roi = torch.ones_like(logits)

    value = confidence_misalignment_penalty(logits, target, roi, tau=0.6, beta=0.5)
    assert float(value) == pytest.approx(0.0044201931 + 0.5 * 0.2967222787, rel=1e-5)


def test_gap_term_reacts_to_under_confidence():
    target = as_pairs([1.0, 0.0, 1.0, 0.0])
    logits = as_pairs([0.1, -0.1, 0.1, -0.1])  # all correct, confidence 0.525
    roi = torch.ones_like(target)

    terms = confidence_misalignment_terms(logits, target, roi)
    assert float(terms.confident_error) == 0.0
    assert float(terms.calibration_gap) == pytest.approx(1.0 - 1.0 / (1.0 + math.exp(-0.1)), rel=1e-5)


def test_empty_pairs_give_differentiable_zero():
    logits = torch.zeros(0, 1, 4, 4, requires_grad=True)
    target = torch.zeros(0, 1, 4, 4)

    value = confidence_misalignment_penalty(logits, target, target)
    assert float(value.detach()) == 0.0
    value.backward()
    assert logits.grad.shape == logits.shape


def test_empty_roi_gives_zero():
    logits = as_pairs([2.0, -1.0])
    target = as_pairs([0.0, 1.0])

    assert float(confidence_misalignment_penalty(logits, target, torch.zeros_like(logits))) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 1.0}, "tau must be"),
        ({"tau": -0.1}, "tau must be"),
        ({"gamma": 0.5}, "gamma must be"),
        ({"gamma": float("inf")}, "gamma must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"beta": True}, "beta must be"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs, message):
    logits = as_pairs([1.0])
    with pytest.raises(ValueError, match=message):
        confidence_misalignment_penalty(logits, logits, logits, **kwargs)


def test_shape_mismatch_is_rejected():
    logits = as_pairs([1.0, 2.0])
    with pytest.raises(ValueError, match="roi must have the shape"):
        confidence_misalignment_penalty(logits, logits, as_pairs([1.0]))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        confidence_misalignment_penalty(logits, [1.0, 0.0], logits)
