"""Named voxel sets over which calibration is reported.

Whole-volume ECE of a brain tumour model is dominated by confident background voxels and comes out near
zero, so calibration is reported over several named sets, from the prompt neighbourhood (the headline
``"box"`` set) to the whole volume. Every set is a bool mask ``(K, H, W, D)``, one channel per region.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .calibration import as_bool_tensor, as_probability_tensor

VOXEL_SET_NAMES: tuple[str, ...] = ("box", "foreground", "union", "brain", "volume")

VOXEL_SET_DEFINITIONS: dict[str, str] = {
    "box": (
        "Voxels inside the region's prompt boxes after dilating them by the box margin: m_h and m_w voxels "
        "in-plane and m_d slices through-plane, so slices next to a prompted slice are included."
    ),
    "foreground": "Voxels of the region's ground truth.",
    "union": "Voxels of the region's ground truth or its prediction (probability >= 0.5).",
    "brain": "Voxels of the brain mask, the same for every region.",
    "volume": "Every voxel of the image.",
}

__all__ = ["VOXEL_SET_DEFINITIONS", "VOXEL_SET_NAMES", "build_voxel_sets", "dilate_box"]


def dilate_box(mask: torch.Tensor, margin: Sequence[int]) -> torch.Tensor:
    """Dilate bool masks with a box structuring element of half-widths ``margin`` along H, W and D.

    Only the bounding box of all channels' voxels, grown by the margin, can change, so the dilation runs on
    that crop. A box is separable, so three one-dimensional max-pools replace one 3D pool.

    Args:
        mask: ``(K, H, W, D)`` bool.
        margin: ``(m_h, m_w, m_d)`` non-negative voxel counts.

    Returns:
        ``(K, H, W, D)`` bool; voxels beyond the image border are treated as background.
    """
    dilated = torch.zeros_like(mask)
    if not bool(mask.any()):
        return dilated
    crop = [slice(None)]
    for axis, half_width in enumerate(margin, start=1):
        other_axes = tuple(a for a in range(4) if a != axis)
        present = torch.nonzero(mask.any(dim=other_axes)).flatten()
        first = max(int(present[0]) - half_width, 0)
        stop = min(int(present[-1]) + half_width + 1, mask.shape[axis])
        crop.append(slice(first, stop))
    crop = tuple(crop)

    pooled = mask[crop].float().unsqueeze(0)  # (1, K, h, w, d): max_pool3d treats K as channels
    for axis, half_width in enumerate(margin):
        if half_width == 0:
            continue
        kernel = [1, 1, 1]
        padding = [0, 0, 0]
        kernel[axis] = 2 * half_width + 1
        padding[axis] = half_width
        pooled = F.max_pool3d(pooled, kernel_size=kernel, stride=1, padding=padding)
    dilated[crop] = pooled.squeeze(0) > 0
    return dilated


def _validate_margin(box_margin) -> tuple[int, int, int]:
    message = f"box_margin must be three non-negative integers (m_h, m_w, m_d) in voxels, got {box_margin!r}."
    try:
        margin = tuple(operator.index(m) for m in box_margin)
    except TypeError:
        raise ValueError(message) from None
    if len(margin) != 3 or min(margin) < 0 or any(isinstance(m, bool) for m in box_margin):
        raise ValueError(message)
    return margin


def build_voxel_sets(
    label,
    prob,
    box_mask,
    brain_mask,
    box_margin: Sequence[int] = (5, 5, 1),
    *,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Build the named voxel sets of one case; ``VOXEL_SET_DEFINITIONS`` defines each.

    Args:
        label: ``(K, H, W, D)`` bool ground truth per region.
        prob: ``(K, H, W, D)`` probabilities; only ``"union"`` uses them, so it may be ``None`` otherwise.
        box_mask: ``(K, H, W, D)`` bool filled prompt boxes, empty on slices without a prompt; may be
            ``None`` unless ``"box"`` is requested.
        brain_mask: ``(H, W, D)`` bool, or ``(1, H, W, D)``; may be ``None`` unless ``"brain"`` is requested.
        box_margin: ``(m_h, m_w, m_d)`` dilation of the prompt boxes in voxels.
        names: the sets to build, all of ``VOXEL_SET_NAMES`` by default.

    Returns:
        ``{name: (K, H, W, D) bool}`` in the order of ``names``.

    Raises:
        TypeError: an input is not a tensor or array.
        ValueError: shapes disagree, a mask is not binary, ``prob`` leaves [0, 1], the margin is invalid,
            or a name is unknown.
    """
    names = tuple(VOXEL_SET_NAMES if names is None else names)
    unknown = [name for name in names if name not in VOXEL_SET_DEFINITIONS]
    if unknown:
        raise ValueError(f"Unknown voxel set names {unknown}; choose from {list(VOXEL_SET_NAMES)}.")
    margin = _validate_margin(box_margin)

    label = as_bool_tensor("label", label)
    if label.ndim != 4:
        raise ValueError(f"label must have shape (K, H, W, D), got {tuple(label.shape)}.")
    k, h, w, d = label.shape
    if "box" in names:
        if box_mask is None:
            raise ValueError("The 'box' voxel set needs box_mask (K, H, W, D), got None.")
        box_mask = as_bool_tensor("box_mask", box_mask)
        if box_mask.shape != label.shape:
            raise ValueError(f"box_mask has shape {tuple(box_mask.shape)} but label has {tuple(label.shape)}.")
    if "brain" in names:
        if brain_mask is None:
            raise ValueError("The 'brain' voxel set needs brain_mask (H, W, D), got None.")
        brain_mask = as_bool_tensor("brain_mask", brain_mask)
        if brain_mask.ndim == 4 and brain_mask.shape[0] == 1:
            brain_mask = brain_mask[0]
        if brain_mask.shape != (h, w, d):
            raise ValueError(f"brain_mask must have shape (H, W, D) = {(h, w, d)}, got {tuple(brain_mask.shape)}.")

    sets: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "box":
            sets[name] = dilate_box(box_mask, margin)
        elif name == "foreground":
            sets[name] = label.clone()
        elif name == "union":
            if prob is None:
                raise ValueError("The 'union' voxel set needs prob (K, H, W, D), got None.")
            prob_tensor = as_probability_tensor("prob", prob)
            if prob_tensor.shape != label.shape:
                raise ValueError(f"prob has shape {tuple(prob_tensor.shape)} but label has {tuple(label.shape)}.")
            sets[name] = label | (prob_tensor >= 0.5)
        elif name == "brain":
            sets[name] = brain_mask.expand(k, h, w, d).clone()
        else:
            sets[name] = torch.ones((k, h, w, d), dtype=torch.bool)
    return sets
