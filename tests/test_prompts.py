"""Box prompts from label slices: empty slices, single pixels, borders and jitter."""

import torch

from scripts.prompts import box_masks, boxes_from_masks, jitter_boxes


def test_empty_slice_gets_no_box():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)
    boxes, valid = boxes_from_masks(masks)
    assert not bool(valid.any())
    assert float(boxes.abs().max()) == 0.0


def test_single_pixel_box_covers_that_pixel():
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[3, 7] = True
    boxes, valid = boxes_from_masks(mask)
    assert bool(valid)
    assert boxes.tolist() == [7.0, 3.0, 8.0, 4.0]
    raster = box_masks(boxes, valid, (8, 10))
    assert torch.equal(raster, mask)


def test_box_at_border():
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[0:2, 8:10] = True
    boxes, valid = boxes_from_masks(mask)
    assert boxes.tolist() == [8.0, 0.0, 10.0, 2.0]
    assert torch.equal(box_masks(boxes, valid, (8, 10)), mask)


def test_jitter_stays_inside_slice_and_nonempty():
    mask = torch.zeros(50, 8, 10, dtype=torch.bool)
    mask[:, 0, 9] = True  # corner pixel: jitter pushes edges outside, clipping must bring them back
    boxes, valid = boxes_from_masks(mask)
    jittered = jitter_boxes(
        boxes, valid, (8, 10), max_shift_fraction=0.5, max_shift_pixels=3.0, generator=torch.Generator().manual_seed(0)
    )
    assert float(jittered[:, 0].min()) >= 0.0 and float(jittered[:, 2].max()) <= 10.0
    assert float(jittered[:, 1].min()) >= 0.0 and float(jittered[:, 3].max()) <= 8.0
    assert bool(((jittered[:, 2] - jittered[:, 0]) >= 1 - 1e-5).all())
    assert bool(((jittered[:, 3] - jittered[:, 1]) >= 1 - 1e-5).all())
    assert box_masks(jittered, valid, (8, 10)).flatten(1).any(dim=1).all()


def test_jitter_reproducible_and_keeps_invalid_zero():
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([True, False])
    first = jitter_boxes(boxes, valid, (8, 8), generator=torch.Generator().manual_seed(3))
    second = jitter_boxes(boxes, valid, (8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert first[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_box_mask_margin_grows_box():
    boxes = torch.tensor([[4.0, 4.0, 6.0, 6.0]])
    grown = box_masks(boxes, torch.tensor([True]), (10, 10), margin=2)
    assert int(grown.sum()) == 36
