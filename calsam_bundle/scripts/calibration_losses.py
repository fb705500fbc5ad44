"""Train-time calibration baselines with the call signature of the recipe's ``DiceCELoss(sigmoid=True, batch=True)``.

Every loss takes decoder logits ``z`` and binary targets ``y`` of one shape ``(B, K, H, W)``, with ``K`` sigmoid
region channels, and returns a scalar. The trainer passes ``(P, 1, H, W)``: one prompted (slice, region) pair per row.
The Dice term is MONAI's ``DiceLoss(sigmoid=True, batch=True)`` on the hard targets in all three losses, so they
differ from the recipe's loss only in the cross-entropy term or an added penalty.

A sigmoid channel is a two-class problem with class logits ``(0, z)``: their softmax is ``(1 - sigmoid(z),
sigmoid(z))`` exactly, so softmax-based calibration losses apply to each region channel through that mapping.

- ``LabelSmoothingDiceBCELoss``: binary cross-entropy against smoothed targets ``y (1 - eps) + eps / 2``.
  MONAI 1.6.1's ``DiceCELoss(label_smoothing=eps)`` passes ``eps`` only to ``nn.CrossEntropyLoss``; with one
  sigmoid channel it calls ``nn.BCEWithLogitsLoss`` and the smoothing is silently ignored, hence this wrapper.
  The smoothed targets equal those of two-class softmax label smoothing (``(1 - eps) onehot + eps / 2``).
- ``MarginLabelSmoothingLoss``: margin-based label smoothing (MbLS; Liu et al., "The Devil is in the Margins:
  Margin-based Label Smoothing for Network Calibration", CVPR 2022): Dice + BCE + ``lambda * mean(relu(d - m))``
  where ``d`` are the distances of each class logit to the largest one. For the logits ``(0, z)`` these are
  ``|z|`` and 0, and ``relu(0 - m) = 0`` for ``m > 0``, so the penalty per voxel is ``relu(|z| - m)``.
- ``NeighbourAwareDiceCELoss``: Dice + MONAI's ``NACLLoss`` (Murugesan et al., MICCAI 2023) on the two-class
  logits of each region channel, averaged over channels. ``NACLLoss`` is cross-entropy plus
  ``alpha * mean(|u - logits|)``, ``u`` the mean-filtered one-hot target, so it takes the place of the BCE term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, NACLLoss
from torch import nn

__all__ = [
    "LabelSmoothingDiceBCELoss",
    "MarginLabelSmoothingLoss",
    "NeighbourAwareDiceCELoss",
    "smooth_binary_targets",
    "two_class_logits",
]


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim < 3 or logits.shape != target.shape:
        raise ValueError(
            "Expected logits and target of one shape (B, K, H, W) or (B, K, H, W, D), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}."
        )


def smooth_binary_targets(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Return ``target (1 - smoothing) + smoothing / 2``: two-class label smoothing written for one sigmoid channel."""
    return target.float() * (1.0 - smoothing) + 0.5 * smoothing


def two_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Map sigmoid logits ``(B, ...)`` to softmax class logits ``(B, 2, ...)`` with class 0 fixed at 0.

    ``softmax((0, z)) = (1 - sigmoid(z), sigmoid(z))``, so cross-entropy on the result equals BCE on ``z``.
    """
    return torch.stack((torch.zeros_like(logits), logits), dim=1)


class LabelSmoothingDiceBCELoss(nn.Module):
    """Dice loss on hard targets plus BCE against label-smoothed targets.

    Args:
        smoothing: label smoothing ``eps`` in [0, 1); targets become ``eps / 2`` and ``1 - eps / 2``.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
        self.smoothing = float(smoothing)
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and binary targets of shape ``(B, K, H, W)``."""
        _check_pair(logits, target)
        smoothed = smooth_binary_targets(target, self.smoothing)
        return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, smoothed)


class MarginLabelSmoothingLoss(nn.Module):
    """Dice + BCE plus the MbLS margin penalty ``weight * mean(relu(|z| - margin))`` over all logits.

    Args:
        margin: logit distance ``m`` below which no penalty applies. The default 10 is the default margin of the
            authors' reference loss (``CELogitMarginL1``).
        weight: penalty weight ``lambda``. The default 0.1 is the default weight of that reference loss.
    """

    def __init__(self, margin: float = 10.0, weight: float = 0.1) -> None:
        super().__init__()
        if float(margin) <= 0 or float(weight) < 0:
            raise ValueError(f"margin must be positive and weight non-negative, got {margin} and {weight}.")
        self.margin = float(margin)
        self.weight = float(weight)
        self.dice = DiceLoss(sigmoid=True, batch=True)

    def margin_penalty(self, logits: torch.Tensor) -> torch.Tensor:
        """Return ``mean(relu(|z| - margin))``, where ``|z|`` is the distance between the class logits ``(0, z)``."""
        return F.relu(logits.abs() - self.margin).mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and binary targets of shape ``(B, K, H, W)``."""
        _check_pair(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target.float())
        return self.dice(logits, target) + bce + self.weight * self.margin_penalty(logits)


class NeighbourAwareDiceCELoss(nn.Module):
    """Dice loss plus MONAI's ``NACLLoss`` on the two-class logits ``(0, z)`` of each region channel.

    Args:
        kernel_size: side of NACL's spatial filter in voxels.
        kernel_ops: ``"mean"`` or ``"gaussian"`` filter of the one-hot target.
        distance_type: ``"l1"`` or ``"l2"`` distance between the filtered target and the logits.
        alpha: weight of the logit constraint relative to cross-entropy.
        sigma: standard deviation of the Gaussian filter, used with ``kernel_ops="gaussian"``.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        kernel_ops: str = "mean",
        distance_type: str = "l1",
        alpha: float = 0.1,
        sigma: float = 1.0,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.options = {
            "kernel_size": int(kernel_size),
            "kernel_ops": kernel_ops,
            "distance_type": distance_type,
            "alpha": float(alpha),
            "sigma": float(sigma),
        }
        # Built here only to validate the options early. forward() builds one per call for the input's spatial
        # rank (2D slices or 3D volumes), because NACLLoss fixes the rank at construction.
        NACLLoss(classes=2, dim=2, **self.options)

    def neighbour_aware_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return NACL averaged over the ``K`` channels, each channel as a two-class problem."""
        nacl = NACLLoss(classes=2, dim=logits.ndim - 2, **self.options).to(logits.device)
        per_channel = [
            nacl(two_class_logits(logits[:, k]), target[:, k].round().long()) for k in range(logits.shape[1])
        ]
        return torch.stack(per_channel).mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and binary targets of shape ``(B, K, H, W)``."""
        _check_pair(logits, target)
        return self.dice(logits, target) + self.neighbour_aware_ce(logits, target)
