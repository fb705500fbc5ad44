"""Map MRI slices to SAM's encoder input and decoder masks back to the native slice grid.

SAM expects a square ``(3, T, T)`` input: intensities on a [0, 255] scale, the longest side resized to ``T``,
normalised by SAM's pixel mean and std, zero padding at the bottom and right. Its decoder returns masks at
``T / 4``; the inverse upsamples to ``T``, crops the padding, and resizes to the native ``(H, W)``.

Box coordinates follow SAM: ``(x0, y0, x1, y1)`` with ``x`` along the slice's second axis (``W``) and ``y``
along its first (``H``). Boxes use pixel-edge coordinates, so a box around the single pixel ``(r, c)`` is
``(c, r, c + 1, r + 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sam_builder import PIXEL_MEAN, PIXEL_STD


def resized_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """Return ``(h, w)`` after scaling the longest side of a ``height x width`` slice to ``target``."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def scale_intensity_to_255(
    volume: torch.Tensor, brain_mask: torch.Tensor, lower: float = 0.5, upper: float = 99.5
) -> torch.Tensor:
    """Clip each channel to percentiles inside the brain and rescale to [0, 255]; zero outside the brain.

    Percentiles come from brain voxels only, because the zero background of skull-stripped MRI would otherwise
    pull the lower percentile to 0 and compress the tissue contrast.

    Args:
        volume: ``(C, H, W, D)`` intensities.
        brain_mask: ``(H, W, D)`` bool.
        lower: lower percentile in [0, 100).
        upper: upper percentile in (lower, 100].

    Returns:
        ``(C, H, W, D)`` float32 in [0, 255].
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"Percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
    volume = volume.float()
    scaled = torch.zeros_like(volume)
    if not bool(brain_mask.any()):
        return scaled
    inside = volume[:, brain_mask]
    quantiles = torch.quantile(inside, torch.tensor([lower / 100.0, upper / 100.0]), dim=1)
    low, high = quantiles[0][:, None, None, None], quantiles[1][:, None, None, None]
    span = (high - low).clamp_min(1e-6)
    scaled = ((volume.clamp(low, high) - low) / span * 255.0) * brain_mask
    return scaled


def slices_to_encoder_input(slices: torch.Tensor, target: int) -> torch.Tensor:
    """Resize, normalise and pad ``(B, 3, H, W)`` slices on the [0, 255] scale to ``(B, 3, T, T)``."""
    b, c, h, w = slices.shape
    if c != 3:
        raise ValueError(f"SAM takes 3-channel slices, got {c} channels; choose 3 image channels or repeat one.")
    new_h, new_w = resized_shape(h, w, target)
    resized = F.interpolate(slices.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(PIXEL_MEAN, device=slices.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=slices.device).view(1, 3, 1, 1)
    normalised = (resized - mean) / std
    return F.pad(normalised, (0, target - new_w, 0, target - new_h))


def boxes_to_encoder_frame(boxes: torch.Tensor, native_hw: tuple[int, int], target: int) -> torch.Tensor:
    """Scale ``(P, 4)`` native ``(x0, y0, x1, y1)`` boxes to the encoder input frame."""
    h, w = native_hw
    new_h, new_w = resized_shape(h, w, target)
    scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def points_to_encoder_frame(points: torch.Tensor, native_hw: tuple[int, int], target: int) -> torch.Tensor:
    """Scale ``(P, N, 2)`` native ``(x, y)`` points, given at pixel centres, to the encoder input frame."""
    h, w = native_hw
    new_h, new_w = resized_shape(h, w, target)
    scale = torch.tensor([new_w / w, new_h / h], dtype=points.dtype, device=points.device)
    return points * scale


def lowres_to_native(masks: torch.Tensor, native_hw: tuple[int, int], target: int) -> torch.Tensor:
    """Map ``(P, M, T/4, T/4)`` decoder logits to ``(P, M, H, W)`` on the native slice grid.

    Interpolating logits rather than probabilities keeps the map differentiable and the 0.5 contour smooth.
    """
    h, w = native_hw
    new_h, new_w = resized_shape(h, w, target)
    upsampled = F.interpolate(masks, size=(target, target), mode="bilinear", align_corners=False)
    cropped = upsampled[..., :new_h, :new_w]
    return F.interpolate(cropped, size=(h, w), mode="bilinear", align_corners=False)


def native_to_lowres(masks: torch.Tensor, target: int) -> torch.Tensor:
    """Map ``(P, M, H, W)`` native masks into the decoder's ``(P, M, T/4, T/4)`` frame, padding with zeros.

    The forward counterpart of ``lowres_to_native``; the round-trip test uses it to place a known shape in the
    decoder frame.
    """
    h, w = masks.shape[-2:]
    new_h, new_w = resized_shape(h, w, target)
    resized = F.interpolate(masks.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, target - new_w, 0, target - new_h))
    low = target // 4
    return F.interpolate(padded, size=(low, low), mode="bilinear", align_corners=False, antialias=True)
