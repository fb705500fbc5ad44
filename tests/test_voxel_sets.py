"""Voxel sets: box dilation geometry, set contents and input checks."""

import pytest
import torch

from scripts.voxel_sets import VOXEL_SET_DEFINITIONS, VOXEL_SET_NAMES, build_voxel_sets, dilate_box

K, H, W, D = 2, 30, 30, 12


def _inputs():
    label = torch.zeros((K, H, W, D), dtype=torch.bool)
    label[0, 10:14, 10:14, 5] = True
    prob = torch.zeros((K, H, W, D))
    prob[0, 12:16, 10:14, 5] = 0.8  # two rows overlap the label, two rows are false positives
    box = torch.zeros((K, H, W, D), dtype=torch.bool)
    box[0, 8:16, 9:15, 5] = True  # an 8 x 6 box on slice 5 only, and no prompt in channel 1
    brain = torch.zeros((H, W, D), dtype=torch.bool)
    brain[2:28, 2:28, :] = True
    return label, prob, box, brain


def test_box_dilated_by_margin():
    label, prob, box, brain = _inputs()
    sets = build_voxel_sets(label, prob, box, brain, box_margin=(2, 1, 1))
    # In-plane (8 + 2 * 2) x (6 + 2 * 1) = 12 x 8 on slices 4, 5 and 6.
    assert sets["box"][0].sum().item() == 12 * 8 * 3
    assert sets["box"][0, 6:18, 8:16, 4:7].all()
    assert sets["box"][1].sum().item() == 0


def test_box_dilation_clipped_at_image_border():
    box = torch.zeros((1, 10, 10, 4), dtype=torch.bool)
    box[0, 0:2, 0:2, 0] = True
    # Rows 0..3, columns 0..3 (the margin beyond index 0 falls outside the image), slices 0..1.
    assert dilate_box(box, (2, 2, 1)).sum().item() == 4 * 4 * 2


def test_zero_margin_keeps_boxes():
    _, _, box, _ = _inputs()
    assert torch.equal(dilate_box(box, (0, 0, 0)), box)


def test_foreground_union_brain_volume():
    label, prob, box, brain = _inputs()
    sets = build_voxel_sets(label, prob, box, brain)
    assert torch.equal(sets["foreground"], label)
    # Label rows 10..13 plus predicted rows 12..15, four columns: 6 rows x 4 columns.
    assert sets["union"][0].sum().item() == 6 * 4
    assert torch.equal(sets["brain"][1], brain)
    assert sets["volume"].all()
    assert sets["volume"].shape == (K, H, W, D)


def test_names_select_sets():
    label, prob, box, brain = _inputs()
    sets = build_voxel_sets(label, None, box, None, names=["box"])
    assert list(sets) == ["box"]


def test_every_set_has_definition():
    assert set(VOXEL_SET_NAMES) == set(VOXEL_SET_DEFINITIONS)


@pytest.mark.parametrize("margin", [(1, 1), (1, -1, 1), (1.5, 1, 1), (True, 1, 1)])
def test_invalid_margin_raises(margin):
    label, prob, box, brain = _inputs()
    with pytest.raises(ValueError, match="box_margin"):
        build_voxel_sets(label, prob, box, brain, box_margin=margin)


def test_missing_box_mask_raises():
    label, prob, _, brain = _inputs()
    with pytest.raises(ValueError, match="box_mask"):
        build_voxel_sets(label, prob, None, brain)


def test_brain_mask_shape_checked():
    label, prob, box, _ = _inputs()
    with pytest.raises(ValueError, match="brain_mask"):
        build_voxel_sets(label, prob, box, torch.ones((H, W, D + 1), dtype=torch.bool))
