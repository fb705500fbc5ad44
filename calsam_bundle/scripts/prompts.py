"""Box prompts derived from label slices, with the jitter used in training.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates of the native slice (see ``sam_input``): ``x`` runs
along ``W``, ``y`` along ``H``, and a box around pixels ``r0..r1``, ``c0..c1`` is ``(c0, r0, c1 + 1, r1 + 1)``.
A region absent from a slice gets no box; its ``valid`` flag is False and the network predicts background there.
"""

from __future__ import annotations

import torch


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the tight box of each mask.

    Args:
        masks: ``(..., H, W)`` bool or {0, 1}.

    Returns:
        ``boxes`` of shape ``(..., 4)`` float32 (zeros where the mask is empty) and ``valid`` of shape ``(...)``
        bool, True where the mask has a foreground pixel.
    """
    masks = masks.bool()
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (..., H)
    cols = masks.any(dim=-2)  # (..., W)
    valid = rows.any(dim=-1)
    row_index = torch.arange(h, device=masks.device)
    col_index = torch.arange(w, device=masks.device)
    # Empty rows get +/- h so that min/max ignore them; invalid boxes are zeroed below.
    r0 = torch.where(rows, row_index, h).amin(dim=-1)
    r1 = torch.where(rows, row_index, -1).amax(dim=-1) + 1
    c0 = torch.where(cols, col_index, w).amin(dim=-1)
    c1 = torch.where(cols, col_index, -1).amax(dim=-1) + 1
    boxes = torch.stack([c0, r0, c1, r1], dim=-1).float()
    return boxes * valid.unsqueeze(-1), valid


def jitter_boxes(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    native_hw: tuple[int, int],
    *,
    max_shift_fraction: float = 0.1,
    max_shift_pixels: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each box edge independently by a random amount and clip the box to the slice.

    Each edge moves uniformly within ``+/- (max_shift_fraction * side + max_shift_pixels)``, where ``side`` is
    the box width for ``x`` edges and height for ``y`` edges; the pixel term keeps tiny boxes from getting no
    jitter. After clipping, every box still covers at least one pixel.

    Args:
        boxes: ``(..., 4)`` native boxes.
        valid: ``(...)`` bool; invalid boxes are returned unchanged (zeros).
        native_hw: slice size ``(H, W)`` for clipping.
        max_shift_fraction: jitter relative to the box side, >= 0.
        max_shift_pixels: jitter floor in pixels, >= 0.
        generator: torch RNG for reproducible prompts.

    Returns:
        ``(..., 4)`` jittered boxes.
    """
    if max_shift_fraction < 0 or max_shift_pixels < 0:
        raise ValueError(
            f"Box jitter must be >= 0, got max_shift_fraction={max_shift_fraction}, "
            f"max_shift_pixels={max_shift_pixels}."
        )
    h, w = native_hw
    width = (boxes[..., 2] - boxes[..., 0]).unsqueeze(-1)
    height = (boxes[..., 3] - boxes[..., 1]).unsqueeze(-1)
    sides = torch.cat([width, height, width, height], dim=-1)
    reach = max_shift_fraction * sides + max_shift_pixels
    noise = torch.rand(boxes.shape, generator=generator, device="cpu").to(boxes.device) * 2.0 - 1.0
    moved = boxes + noise * reach
    return clip_boxes(torch.where(valid.unsqueeze(-1), moved, boxes), valid, native_hw=(h, w))


def clip_boxes(boxes: torch.Tensor, valid: torch.Tensor, native_hw: tuple[int, int]) -> torch.Tensor:
    """Clip boxes to the slice and keep at least one pixel between opposite edges."""
    h, w = native_hw
    x0 = boxes[..., 0].clamp(0, w - 1)
    y0 = boxes[..., 1].clamp(0, h - 1)
    x1 = torch.maximum(boxes[..., 2].clamp(1, w), x0 + 1)
    y1 = torch.maximum(boxes[..., 3].clamp(1, h), y0 + 1)
    clipped = torch.stack([x0, y0, x1, y1], dim=-1)
    return clipped * valid.unsqueeze(-1)


def box_masks(boxes: torch.Tensor, valid: torch.Tensor, native_hw: tuple[int, int], margin: int = 0) -> torch.Tensor:
    """Rasterise boxes, grown by ``margin`` pixels on every side, to ``(..., H, W)`` bool masks.

    A pixel belongs to the box when its centre lies inside it, so integer pixel-edge boxes cover exactly the
    pixels they were derived from.
    """
    h, w = native_hw
    centres_y = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    centres_x = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0 = (boxes[..., 0] - margin)[..., None, None]
    y0 = (boxes[..., 1] - margin)[..., None, None]
    x1 = (boxes[..., 2] + margin)[..., None, None]
    y1 = (boxes[..., 3] + margin)[..., None, None]
    inside_y = (centres_y[:, None] > y0) & (centres_y[:, None] < y1)
    inside_x = (centres_x[None, :] > x0) & (centres_x[None, :] < x1)
    return inside_y & inside_x & valid[..., None, None]
