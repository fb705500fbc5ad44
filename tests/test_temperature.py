"""Temperature scaling: recovery of a known temperature and input checks."""

import math

import pytest
import torch

from scripts.temperature import apply_temperature, fit_temperature


def test_fit_recovers_known_temperature():
    # Labels follow sigmoid(true_logits). The model reports true_logits * T, so dividing by T recovers
    # calibrated probabilities and the fit must return T. With 200,000 voxels per channel the standard
    # error of the fit is about 0.3 %, so 3 % is a tolerance of roughly ten standard errors.
    generator = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(2, 200_000, generator=generator)
    label = torch.bernoulli(torch.sigmoid(true_logits), generator=generator).bool()
    true_temperature = torch.tensor([2.0, 0.5], dtype=torch.float64)
    logits = true_logits * true_temperature.float().unsqueeze(1)
    fitted = fit_temperature(logits, label)
    assert torch.allclose(fitted, true_temperature, rtol=0.03)


def test_fit_uses_mask_only():
    generator = torch.Generator().manual_seed(1)
    true_logits = 2.0 * torch.randn(1, 100_000, generator=generator)
    label = torch.bernoulli(torch.sigmoid(true_logits), generator=generator).bool()
    logits = true_logits * 3.0
    mask = torch.zeros_like(label)
    mask[:, :50_000] = True
    logits[:, 50_000:] = 0.0  # uninformative voxels outside the mask would pull the fit elsewhere
    assert fit_temperature(logits, label, mask).item() == pytest.approx(3.0, rel=0.05)


def test_apply_temperature_divides_each_channel():
    logits = torch.tensor([[2.0, -4.0], [1.0, 3.0]])
    scaled = apply_temperature(logits, torch.tensor([2.0, 0.5]))
    assert torch.equal(scaled, torch.tensor([[1.0, -2.0], [2.0, 6.0]]))


def test_apply_temperature_broadcasts_over_volume():
    logits = torch.ones((3, 4, 5, 6))
    scaled = apply_temperature(logits, [1.0, 2.0, 4.0])
    assert scaled[:, 1, 2, 3].tolist() == [1.0, 0.5, 0.25]


def test_empty_channel_raises():
    logits = torch.zeros((2, 10))
    mask = torch.ones((2, 10), dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="channels \\[1\\]"):
        fit_temperature(logits, torch.zeros((2, 10), dtype=torch.bool), mask)


def test_no_voxels_raises():
    with pytest.raises(ValueError, match="without voxels"):
        fit_temperature(torch.zeros((1, 0)), torch.zeros((1, 0), dtype=torch.bool))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise(bad):
    logits = torch.zeros((1, 5))
    logits[0, 3] = bad
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(logits, torch.zeros((1, 5), dtype=torch.bool))


def test_one_class_labels_warn_at_bound():
    logits = torch.linspace(-3, 3, 1000).unsqueeze(0)
    with pytest.warns(UserWarning, match="reach the bounds"):
        fit_temperature(logits, torch.ones((1, 1000), dtype=torch.bool))


@pytest.mark.parametrize("temperature", [[0.0, 1.0], [1.0, -2.0], [1.0, math.nan], [1.0]])
def test_apply_invalid_temperature_raises(temperature):
    with pytest.raises(ValueError, match="emperature"):
        apply_temperature(torch.zeros((2, 3)), temperature)
