"""Confidence misalignment penalty (CMP) on the decoder's sigmoid outputs.

For every voxel ``v`` of a prompted (slice, region) pair inside the region of interest, with ``p = sigmoid(z)``,
prediction ``yhat = [p >= 0.5]``, confidence ``c = max(p, 1 - p)`` and error ``e = [yhat != y]``:

    CMP = mean_v(e_v * max(0, c_v - tau)^gamma) + beta * |mean_v c_v - mean_v(1 - e_v)|

Means are ROI-weighted over all voxels of all pairs of the slab. The first term penalises confident errors. The
second, the absolute difference between confidence and accuracy (DCA), also reacts to under-confidence. ``e`` is a
step function of ``z``, so it enters as a constant.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["CMPTerms", "confidence_misalignment_penalty", "confidence_misalignment_terms", "validate_cmp_parameters"]


class CMPTerms(NamedTuple):
    """The two terms of the CMP before weighting, each a 0-d tensor."""

    confident_error: torch.Tensor
    """``mean_v(e_v * max(0, c_v - tau)^gamma)``."""
    calibration_gap: torch.Tensor
    """``|mean_v c_v - mean_v(1 - e_v)|``, the confidence-accuracy difference."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_cmp_parameters(tau: float, gamma: float, beta: float) -> None:
    """Raise ValueError unless ``0 <= tau < 1``, ``gamma >= 1`` and ``beta >= 0``.

    ``gamma < 1`` is rejected because the gradient of ``max(0, c - tau)^gamma`` is then unbounded at ``c = tau``.
    """
    if not _is_number(tau) or not 0 <= tau < 1:
        raise ValueError(f"tau must be a confidence threshold in [0, 1), got {tau!r}; 0.5 penalises every error.")
    if not _is_number(gamma) or gamma < 1:
        raise ValueError(
            f"gamma must be a number >= 1 (the gradient of max(0, c - tau)^gamma is unbounded at c = tau for "
            f"gamma < 1), got {gamma!r}."
        )
    if not _is_number(beta) or beta < 0:
        raise ValueError(f"beta must be a non-negative number, got {beta!r}; 0 drops the calibration-gap term.")


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, roi: torch.Tensor) -> None:
    for name, tensor in (("logits", logits), ("target", target), ("roi", roi)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (P, 1, H, W), got {type(tensor).__name__}.")
    if logits.ndim != 4:
        raise ValueError(f"logits must have the shape (P, 1, H, W), got {tuple(logits.shape)}.")
    for name, tensor in (("target", target), ("roi", roi)):
        if tensor.shape != logits.shape:
            raise ValueError(
                f"{name} must have the shape of the logits, {tuple(logits.shape)}, got {tuple(tensor.shape)}."
            )


def confidence_misalignment_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    roi: torch.Tensor,
    *,
    tau: float = 0.5,
    gamma: float = 2.0,
) -> CMPTerms:
    """Compute the two unweighted CMP terms.

    Args:
        logits: decoder logits ``(P, 1, H, W)``.
        target: ground truth ``(P, 1, H, W)`` in {0, 1}; values above 0.5 count as foreground.
        roi: voxel weights ``(P, 1, H, W)``, in {0, 1} for the dilated prompt box. Voxels with weight 0 do not count.
        tau: confidence above which an error is penalised, in [0, 1).
        gamma: exponent of the confidence excess, at least 1.

    Returns:
        :class:`CMPTerms` of 0-d tensors, both zero when ``P == 0`` or the ROI is empty.

    Raises:
        ValueError: on shapes that disagree or parameters out of range.
        TypeError: when an input is not a tensor.
    """
    _check_shapes(logits, target, roi)
    validate_cmp_parameters(tau, gamma, beta=0.0)

    # sigmoid(|z|) is max(p, 1 - p) without the rounding of 1 - p for large |z|.
    confidence = torch.sigmoid(logits.abs())
    predicted = logits >= 0
    error = (predicted != (target > 0.5)).to(logits.dtype)
    weights = roi.to(logits.dtype)
    # An empty ROI has zero numerators too, so the clamp turns 0 / 0 into 0 without changing any other value.
    total = weights.sum().clamp_min(torch.finfo(logits.dtype).tiny)

    excess = torch.clamp(confidence - tau, min=0.0).pow(gamma)
    confident_error = (weights * error * excess).sum() / total
    mean_confidence = (weights * confidence).sum() / total
    accuracy = (weights * (1.0 - error)).sum() / total
    return CMPTerms(confident_error, (mean_confidence - accuracy).abs())


def confidence_misalignment_penalty(
    logits: torch.Tensor,
    target: torch.Tensor,
    roi: torch.Tensor,
    *,
    tau: float = 0.5,
    gamma: float = 2.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """Compute ``confident_error + beta * calibration_gap`` as a 0-d tensor.

    The gradient of the first term is zero on correct voxels and, on a wrong voxel with ``c > tau``, moves ``p``
    toward 0.5. See :func:`confidence_misalignment_terms` for the arguments.

    Raises:
        ValueError: on shapes that disagree or ``tau``, ``gamma`` or ``beta`` out of range.
    """
    validate_cmp_parameters(tau, gamma, beta)
    terms = confidence_misalignment_terms(logits, target, roi, tau=tau, gamma=gamma)
    return terms.confident_error + beta * terms.calibration_gap
