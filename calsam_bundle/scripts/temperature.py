"""Temperature scaling of sigmoid logits, one temperature per region channel.

A temperature ``T`` replaces the probability ``sigmoid(z)`` by ``sigmoid(z / T)``: ``T > 1`` softens an
over-confident model, ``T < 1`` sharpens an under-confident one, and the prediction ``z >= 0`` never changes.
``T`` is fitted by minimising the mean binary negative log-likelihood on held-out voxels (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F

from .calibration import as_bool_tensor

logger = logging.getLogger(__name__)

DEFAULT_BOUNDS = (0.05, 20.0)

__all__ = ["DEFAULT_BOUNDS", "apply_temperature", "fit_temperature"]


def _as_logits(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {tensor.dtype}.")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor[~finite]
        raise ValueError(
            f"{name} must be finite, got {bad.numel()} non-finite values such as {bad[0].item()}; "
            "check the model output for overflow."
        )
    return tensor


def fit_temperature(
    logits,
    label,
    mask=None,
    *,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    max_iter: int = 100,
) -> torch.Tensor:
    """Fit one temperature per region channel by minimising the mean NLL of ``sigmoid(logits / T)``.

    The objective of each channel depends only on its own temperature, so all channels are fitted jointly
    with L-BFGS. The search runs over ``log T`` mapped smoothly into ``log(bounds)`` by a sigmoid, so the
    result always lies inside the bounds and the gradient never vanishes at a bound.

    Args:
        logits: ``(K, N)`` sigmoid logits, for example the prompted voxels of validation cases.
        label: ``(K, N)`` bool ground truth.
        mask: ``(K, N)`` bool voxels to fit on, or ``None`` for all.
        bounds: smallest and largest temperature allowed.
        max_iter: L-BFGS iterations.

    Returns:
        ``(K,)`` float64 temperatures.

    Raises:
        TypeError: ``logits`` is not floating point.
        ValueError: shapes differ, a channel has no voxels, a logit is not finite, or the bounds are invalid.

    Warns:
        UserWarning: a temperature ends within 1 % of a bound, which happens when a channel's labels are all
            one class or its logits carry no information.
    """
    low, high = (float(b) for b in bounds)
    if not 0 < low < 1 < high or not math.isfinite(high):
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high and be finite, got {bounds!r}.")
    logits = _as_logits("logits", logits)
    label = as_bool_tensor("label", label)
    if logits.ndim != 2:
        raise ValueError(
            f"logits must have shape (K, N), one flattened row per region channel, got {tuple(logits.shape)}."
        )
    if label.shape != logits.shape:
        raise ValueError(f"label has shape {tuple(label.shape)} but logits has {tuple(logits.shape)}; they must match.")
    if mask is None:
        mask = torch.ones_like(label)
    mask = as_bool_tensor("mask", mask)
    if mask.shape != logits.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logits has {tuple(logits.shape)}; they must match.")
    n_channels = logits.shape[0]
    counts = mask.sum(dim=1)
    if n_channels == 0 or bool((counts == 0).any()):
        empty = [] if n_channels == 0 else torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"Cannot fit a temperature without voxels: channels {empty} of {n_channels} have none "
            f"(logits shape {tuple(logits.shape)}); pass voxels of every region."
        )

    z = logits.double()
    y = label.double()
    # Weights 1 / count on the selected voxels make the loss a per-channel mean; broadcasting over (K, N)
    # avoids gathering one temperature per voxel.
    weight = mask.double() / counts.unsqueeze(1)
    log_low, log_high = math.log(low), math.log(high)
    # sigmoid(u) = -log_low / (log_high - log_low) puts the start at T = 1.
    start = -log_low / (log_high - log_low)
    u = torch.full((n_channels, 1), math.log(start / (1 - start)), dtype=torch.float64, requires_grad=True)

    def log_temperature() -> torch.Tensor:
        return log_low + (log_high - log_low) * torch.sigmoid(u)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = z * torch.exp(-log_temperature())
        loss = (F.binary_cross_entropy_with_logits(scaled, y, reduction="none") * weight).sum()
        loss.backward()
        return loss

    optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    optimizer.step(closure)

    temperature = torch.exp(log_temperature()).detach().flatten()
    at_bound = (temperature < low * 1.01) | (temperature > high / 1.01)
    if bool(at_bound.any()):
        warnings.warn(
            f"Fitted temperatures {temperature.tolist()} reach the bounds {bounds} for channels "
            f"{torch.nonzero(at_bound).flatten().tolist()}; those labels may be all one class.",
            stacklevel=2,
        )
    logger.info("Fitted temperatures %s on %s voxels per channel.", temperature.tolist(), counts.tolist())
    return temperature


def apply_temperature(logits, temperature) -> torch.Tensor:
    """Divide each region channel of ``logits`` by its temperature.

    Args:
        logits: ``(K, ...)`` logits, for example ``(K, H, W, D)`` or ``(K, N)``.
        temperature: ``(K,)`` positive temperatures.

    Returns:
        Tensor of the shape and floating dtype of ``logits``.

    Raises:
        ValueError: the temperature count differs from K, or a temperature is not positive and finite.
    """
    logits = torch.as_tensor(logits)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}.")
    temperature = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1)
    if logits.ndim == 0 or temperature.numel() != logits.shape[0]:
        raise ValueError(
            f"Expected one temperature per channel ({logits.shape[0] if logits.ndim else 0}), "
            f"got {temperature.tolist()}."
        )
    if not bool((torch.isfinite(temperature) & (temperature > 0)).all()):
        raise ValueError(f"Temperatures must be positive and finite, got {temperature.tolist()}.")
    scale = temperature.to(device=logits.device, dtype=logits.dtype).reshape(-1, *([1] * (logits.ndim - 1)))
    return logits / scale
