"""Geometry of the map to SAM's input frame and back."""

import pytest
import torch

from scripts.sam_builder import PIXEL_MEAN, PIXEL_STD
from scripts.sam_input import (
    boxes_to_encoder_frame,
    lowres_to_native,
    native_to_lowres,
    resized_shape,
    scale_intensity_to_255,
    slices_to_encoder_input,
)


def _disk(h, w, centre, radius):
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2).float()


def _dice(a, b):
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def _centroid(mask):
    rows, cols = torch.nonzero(mask > 0.5, as_tuple=True)
    return torch.stack([rows.float().mean(), cols.float().mean()])


@pytest.mark.parametrize("target", [1024, 512, 256])
def test_round_trip_keeps_disk(target):
    h, w = 155, 240
    disk = _disk(h, w, centre=(70.0, 150.0), radius=25.0)
    lowres = native_to_lowres(disk[None, None], target)
    assert lowres.shape == (1, 1, target // 4, target // 4)
    # Probabilities in [0, 1] map to logits for the inverse, which works on logits.
    logits = torch.logit(lowres.clamp(1e-4, 1 - 1e-4))
    back = (lowres_to_native(logits, (h, w), target) > 0).float()[0, 0]
    assert back.shape == (h, w)
    assert _dice(back, disk) >= 0.97
    assert torch.linalg.norm(_centroid(back) - _centroid(disk)) <= 1.0


def test_resized_shape_longest_side():
    assert resized_shape(155, 240, 1024) == (661, 1024)
    assert resized_shape(240, 155, 1024) == (1024, 661)
    assert resized_shape(256, 256, 256) == (256, 256)


def test_encoder_input_normalised_and_padded():
    slices = torch.full((1, 3, 100, 200), 255.0)
    encoded = slices_to_encoder_input(slices, 256)
    assert encoded.shape == (1, 3, 256, 256)
    expected = (255.0 - PIXEL_MEAN[0]) / PIXEL_STD[0]
    assert torch.allclose(encoded[0, 0, :128, :], torch.full((128, 256), expected), atol=1e-4)
    assert float(encoded[0, :, 128:, :].abs().max()) == 0.0


def test_encoder_input_rejects_wrong_channels():
    with pytest.raises(ValueError, match="3-channel"):
        slices_to_encoder_input(torch.zeros(1, 4, 10, 10), 256)


def test_box_scaling_per_axis():
    boxes = torch.tensor([[10.0, 20.0, 120.0, 100.0]])
    scaled = boxes_to_encoder_frame(boxes, (100, 200), 1024)
    # W=200 -> 1024 (x5.12), H=100 -> 512 (x5.12).
    assert torch.allclose(scaled, boxes * 5.12)


def test_intensity_scaling_uses_brain_percentiles():
    volume = torch.zeros(1, 4, 4, 4)
    brain = torch.zeros(4, 4, 4, dtype=torch.bool)
    brain[1:3, 1:3, 1:3] = True
    volume[0, brain] = torch.linspace(10, 20, int(brain.sum()))
    scaled = scale_intensity_to_255(volume, brain, 0.0, 100.0)
    assert float(scaled[0, brain].min()) == pytest.approx(0.0)
    assert float(scaled[0, brain].max()) == pytest.approx(255.0)
    assert float(scaled[0, ~brain].abs().max()) == 0.0


def test_intensity_scaling_rejects_bad_percentiles():
    with pytest.raises(ValueError, match="lower=90"):
        scale_intensity_to_255(torch.zeros(1, 2, 2, 2), torch.ones(2, 2, 2, dtype=torch.bool), 90, 10)
