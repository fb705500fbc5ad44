"""Dice, HD95 and ASSD on geometry with hand-computed results, and the empty-mask policies."""

import math

import pytest
import torch

from scripts.overlap import (
    average_surface_distance_mm,
    dice,
    hausdorff95_mm,
    surface_distances_mm,
    worst_case_distance_mm,
)

SHAPE = (20, 20, 20)


def _empty():
    return torch.zeros((1, *SHAPE), dtype=torch.bool)


def _two_slabs():
    """Two 5 x 5 one-voxel-thick patches in slices 2 and 6, 4 slices apart along D."""
    first, second = _empty(), _empty()
    first[0, 5:10, 5:10, 2] = True
    second[0, 5:10, 5:10, 6] = True
    return first, second


def test_hd95_slabs_anisotropic_spacing():
    # Every voxel of a one-voxel-thick patch is on its surface, and its nearest voxel of the other patch is
    # straight across: 4 slices * 3 mm = 12 mm.
    first, second = _two_slabs()
    assert hausdorff95_mm(first, second, (1.0, 1.0, 3.0)).item() == pytest.approx(12.0, abs=1e-9)


def test_assd_slabs_anisotropic_spacing():
    first, second = _two_slabs()
    assert average_surface_distance_mm(first, second, (1.0, 1.0, 3.0)).item() == pytest.approx(12.0, abs=1e-9)


def test_hd95_ignores_in_plane_spacing():
    # The same patches with 2 mm in-plane voxels stay 12 mm apart.
    first, second = _two_slabs()
    assert hausdorff95_mm(first, second, (2.0, 2.0, 3.0)).item() == pytest.approx(12.0, abs=1e-9)


def test_shifted_patches_in_plane():
    # Rows 5-9 and 8-12 of one slice, spacing 2 mm along H. From either patch, per row the nearest row of
    # the other one is 0, 0, 1, 2, 3 rows away = 0, 0, 2, 4, 6 mm, five voxels each. Sorted 25 distances:
    # 10 zeros, 5 x 2, 5 x 4, 5 x 6. The 95th percentile (position 22.8 of 0..24) is 6 mm.
    # ASSD = 2 * 5 * (2 + 4 + 6) / 50 = 2.4 mm.
    first, second = _empty(), _empty()
    first[0, 5:10, 5:10, 4] = True
    second[0, 8:13, 5:10, 4] = True
    hd95, assd = surface_distances_mm(first, second, (2.0, 1.0, 1.0))
    assert hd95.item() == pytest.approx(6.0, abs=1e-9)
    assert assd.item() == pytest.approx(2.4, abs=1e-9)


def test_dice_known_overlap():
    # 25 and 25 voxels sharing 10: Dice = 2 * 10 / 50 = 0.4.
    first, second = _empty(), _empty()
    first[0, 5:10, 5:10, 4] = True
    second[0, 8:13, 5:10, 4] = True
    assert dice(first, second).item() == pytest.approx(0.4, abs=1e-12)


def test_dice_both_empty_is_one():
    assert dice(_empty(), _empty()).item() == 1.0


def test_dice_empty_ground_truth_is_zero():
    prediction, _ = _two_slabs()
    assert dice(prediction, _empty()).item() == 0.0


def test_dice_empty_prediction_is_zero():
    _, label = _two_slabs()
    assert dice(_empty(), label).item() == 0.0


def test_distances_both_empty_are_zero():
    hd95, assd = surface_distances_mm(_empty(), _empty(), (1.0, 1.0, 1.0))
    assert hd95.item() == 0.0
    assert assd.item() == 0.0


@pytest.mark.parametrize("empty_side", ["prediction", "label"])
def test_distances_one_empty_are_image_diagonal(empty_side):
    mask, _ = _two_slabs()
    pair = (_empty(), mask) if empty_side == "prediction" else (mask, _empty())
    spacing = (1.0, 2.0, 3.0)
    diagonal = math.sqrt(20**2 + 40**2 + 60**2)
    hd95, assd = surface_distances_mm(*pair, spacing)
    assert hd95.item() == pytest.approx(diagonal, abs=1e-9)
    assert assd.item() == pytest.approx(diagonal, abs=1e-9)
    assert worst_case_distance_mm(SHAPE, spacing) == pytest.approx(diagonal, abs=1e-9)


def test_channels_are_independent():
    first, second = _two_slabs()
    prediction = torch.cat([first, _empty(), first])
    label = torch.cat([second, _empty(), _empty()])
    hd95 = hausdorff95_mm(prediction, label, (1.0, 1.0, 3.0))
    assert hd95.tolist() == pytest.approx([12.0, 0.0, worst_case_distance_mm(SHAPE, (1.0, 1.0, 3.0))])


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, math.nan, 1.0), "1mm"])
def test_invalid_spacing_raises(spacing):
    first, second = _two_slabs()
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95_mm(first, second, spacing)


def test_probabilities_rejected_as_masks():
    first, second = _two_slabs()
    with pytest.raises(ValueError, match="only 0 and 1"):
        dice(first.float() * 0.7, second)
