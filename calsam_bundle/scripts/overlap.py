"""Overlap and surface-distance metrics per region channel: Dice, HD95 and ASSD in millimetres.

Inputs are bool masks ``(K, H, W, D)`` (0/1 values are accepted); distances use the voxel spacing of the
image in its native space. Empty masks follow fixed policies, so no metric is ever NaN:

- Dice: 1 if prediction and ground truth are both empty, 0 if only one of them is (BraTS convention).
- HD95 and ASSD: 0 if both are empty. If only one is empty, the image diagonal in mm,
  ``sqrt(sum((shape * spacing) ** 2))``, which is the largest distance two voxels of the image can have.

Surfaces and distances come from MONAI 1.6 (``monai.metrics.utils.get_edge_surface_distance``): a mask's
surface is its voxels with a 6-connected background neighbour, and each surface voxel gets the exact
Euclidean distance in mm to the nearest surface voxel of the other mask.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

from .calibration import as_bool_tensor

HD_PERCENTILE = 95.0

DICE_EMPTY_POLICY = "1 if prediction and ground truth are both empty, 0 if only one of them is empty."
DISTANCE_EMPTY_POLICY = (
    "0 mm if prediction and ground truth are both empty; the image diagonal sqrt(sum((shape * spacing)^2)) in mm "
    "if only one of them is empty. The value stays in the means."
)

__all__ = [
    "DICE_EMPTY_POLICY",
    "DISTANCE_EMPTY_POLICY",
    "HD_PERCENTILE",
    "average_surface_distance_mm",
    "dice",
    "hausdorff95_mm",
    "surface_distances_mm",
    "validate_spacing",
    "worst_case_distance_mm",
]


def validate_spacing(spacing) -> tuple[float, float, float]:
    """Return ``spacing`` as three positive finite floats (mm along H, W, D).

    Raises:
        ValueError: ``spacing`` does not hold exactly three positive finite numbers.
    """
    message = f"spacing must be three positive voxel sizes in mm along (H, W, D), got {spacing!r}."
    try:
        values = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    values = values.reshape(-1) if values.size == 3 else values
    if values.shape != (3,) or not np.all(np.isfinite(values)) or not np.all(values > 0):
        raise ValueError(message)
    return tuple(float(v) for v in values)


def worst_case_distance_mm(shape: Sequence[int], spacing) -> float:
    """Return the image diagonal in mm, the distance reported when exactly one mask is empty."""
    spacing = validate_spacing(spacing)
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def _validate_pair(pred, label) -> tuple[torch.Tensor, torch.Tensor]:
    pred = as_bool_tensor("pred", pred)
    label = as_bool_tensor("label", label)
    if pred.ndim != 4:
        raise ValueError(f"pred must have shape (K, H, W, D), got {tuple(pred.shape)}; threshold probabilities first.")
    if label.shape != pred.shape:
        raise ValueError(f"label has shape {tuple(label.shape)} but pred has shape {tuple(pred.shape)}.")
    return pred, label


def dice(pred, label) -> torch.Tensor:
    """Compute the Dice coefficient ``2 |P & G| / (|P| + |G|)`` per region channel.

    Args:
        pred: ``(K, H, W, D)`` bool prediction.
        label: ``(K, H, W, D)`` bool ground truth.

    Returns:
        ``(K,)`` float64; 1 where both masks are empty, 0 where only one is.

    Raises:
        TypeError, ValueError: an input is not a binary tensor or array, or the shapes differ.
    """
    pred, label = _validate_pair(pred, label)
    k = pred.shape[0]
    intersection = (pred & label).reshape(k, -1).sum(dim=1).double()
    total = pred.reshape(k, -1).sum(dim=1).double() + label.reshape(k, -1).sum(dim=1).double()
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), 1.0)


def surface_distances_mm(pred, label, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute HD95 and the average symmetric surface distance (ASSD) per channel, in mm.

    HD95 is the larger of the two directed 95th percentiles (linear interpolation, ``torch.quantile``) of
    surface-to-surface distances. ASSD is the mean over the distances of both directions pooled, so
    ``(sum d(P->G) + sum d(G->P)) / (|surface P| + |surface G|)``.

    Args:
        pred: ``(K, H, W, D)`` bool prediction.
        label: ``(K, H, W, D)`` bool ground truth.
        spacing: three voxel sizes in mm along H, W, D.

    Returns:
        ``(hd95, assd)``, each ``(K,)`` float64 and never NaN; empty masks follow ``DISTANCE_EMPTY_POLICY``.

    Raises:
        TypeError, ValueError: invalid masks, shapes or spacing.
    """
    pred, label = _validate_pair(pred, label)
    spacing = validate_spacing(spacing)
    k, h, w, d = pred.shape
    pred_any = pred.reshape(k, -1).any(dim=1)
    label_any = label.reshape(k, -1).any(dim=1)
    worst = worst_case_distance_mm((h, w, d), spacing)

    hd95 = torch.where(pred_any == label_any, 0.0, torch.full((k,), worst, dtype=torch.float64))
    assd = hd95.clone()
    # MONAI computes one channel per call; only channels with both masks non-empty need distances.
    for channel in torch.nonzero(pred_any & label_any).flatten().tolist():
        with warnings.catch_warnings():
            # MONAI 1.6.1 passes its own deprecated ``always_return_as_numpy`` argument internally and warns on
            # every call; the warning concerns MONAI's code, not this call.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            _, distances, _ = get_edge_surface_distance(
                pred[channel], label[channel], spacing=spacing, symmetric=True, warn_empty=False
            )
        pred_to_label, label_to_pred = (dist.double() for dist in distances)
        hd95[channel] = torch.maximum(
            torch.quantile(pred_to_label, HD_PERCENTILE / 100), torch.quantile(label_to_pred, HD_PERCENTILE / 100)
        )
        assd[channel] = torch.cat([pred_to_label, label_to_pred]).mean()
    return hd95, assd


def hausdorff95_mm(pred, label, spacing) -> torch.Tensor:
    """Compute the 95th-percentile Hausdorff distance in mm per channel; see ``surface_distances_mm``.

    Returns:
        ``(K,)`` float64; 0 if both masks are empty, the image diagonal in mm if exactly one is.
    """
    return surface_distances_mm(pred, label, spacing)[0]


def average_surface_distance_mm(pred, label, spacing) -> torch.Tensor:
    """Compute the average symmetric surface distance (ASSD) in mm per channel; see ``surface_distances_mm``.

    Returns:
        ``(K,)`` float64; 0 if both masks are empty, the image diagonal in mm if exactly one is.
    """
    return surface_distances_mm(pred, label, spacing)[1]
