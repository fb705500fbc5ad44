"""Intensity augmentation of slab slices before the frozen encoder.

Scanner changes alter the intensity transfer curve, noise, blur and bias field; randomising these during
training teaches the decoder features that survive them. The encoder must then run on every step, because a
cached embedding belongs to the unaugmented pixels. Each random draw is separated from its application, so an
augmented slab can be replayed from its recorded parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentationParameters:
    """One draw: per-channel gamma, noise standard deviation on the [0, 255] scale, blur sigma in pixels, and the
    four coefficients of a linear-plus-quadratic log bias field over normalised slice coordinates."""

    gamma: tuple[float, float, float]
    noise_std: float
    blur_sigma: float
    bias: tuple[float, float, float, float]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def apply_augmentation(
    slices: torch.Tensor, parameters: AugmentationParameters, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply one draw to ``(S, 3, H, W)`` slices on the [0, 255] scale; zero background stays zero.

    ``generator`` seeds the noise pattern, the only part not stored in ``parameters``.
    """
    s, c, h, w = slices.shape
    brain = (slices > 0).any(dim=1, keepdim=True)
    unit = (slices / 255.0).clamp(0.0, 1.0)
    gamma = torch.tensor(parameters.gamma, dtype=slices.dtype, device=slices.device).view(1, c, 1, 1)
    out = unit.pow(gamma)

    rows = torch.linspace(-1.0, 1.0, h, device=slices.device).view(1, 1, h, 1)
    cols = torch.linspace(-1.0, 1.0, w, device=slices.device).view(1, 1, 1, w)
    a, b, q_rows, q_cols = parameters.bias
    out = out * torch.exp(a * rows + b * cols + q_rows * rows**2 + q_cols * cols**2)

    if parameters.blur_sigma > 0:
        kernel = _gaussian_kernel(parameters.blur_sigma).to(slices.device)
        pad = len(kernel) // 2
        flat = out.reshape(s * c, 1, h, w)
        flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
        out = flat.reshape(s, c, h, w)

    if parameters.noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype) * (parameters.noise_std / 255.0)
        out = out + noise.to(out.device)
    return (out.clamp(0.0, 1.0) * 255.0) * brain


class RandomIntensityAugmentation:
    """Draw and apply gamma, bias field, blur and noise changes with probability ``probability`` per slab.

    Args:
        gamma_range: range of the per-channel gamma exponent.
        max_noise_std: largest Gaussian noise standard deviation on the [0, 255] scale.
        max_blur_sigma: largest Gaussian blur sigma in pixels.
        max_bias: largest absolute coefficient of the log bias field.
        probability: chance that a slab is augmented at all.
        seed: seed of the augmentation RNG.
    """

    def __init__(
        self,
        gamma_range: tuple[float, float] = (0.6, 1.6),
        max_noise_std: float = 12.0,
        max_blur_sigma: float = 1.2,
        max_bias: float = 0.3,
        probability: float = 0.8,
        seed: int = 0,
    ) -> None:
        low, high = gamma_range
        if not 0 < low <= high:
            raise ValueError(f"gamma_range must satisfy 0 < low <= high, got {gamma_range}.")
        if min(max_noise_std, max_blur_sigma, max_bias) < 0 or not 0.0 <= probability <= 1.0:
            raise ValueError(
                "Noise, blur and bias limits must be >= 0 and probability in [0, 1], got "
                f"max_noise_std={max_noise_std}, max_blur_sigma={max_blur_sigma}, max_bias={max_bias}, "
                f"probability={probability}."
            )
        self.gamma_range = (float(low), float(high))
        self.max_noise_std = float(max_noise_std)
        self.max_blur_sigma = float(max_blur_sigma)
        self.max_bias = float(max_bias)
        self.probability = float(probability)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _uniform(self, low: float, high: float, count: int = 1) -> list[float]:
        return (torch.rand(count, generator=self.generator) * (high - low) + low).tolist()

    def draw(self) -> AugmentationParameters | None:
        """Draw the parameters of one slab, or ``None`` when the slab stays unchanged."""
        if float(torch.rand(1, generator=self.generator)) >= self.probability:
            return None
        # Gamma is drawn on a log scale so that darkening and brightening are equally likely.
        log_low, log_high = torch.log(torch.tensor(self.gamma_range)).tolist()
        gamma = tuple(float(torch.exp(torch.tensor(v))) for v in self._uniform(log_low, log_high, 3))
        return AugmentationParameters(
            gamma=gamma,
            noise_std=self._uniform(0.0, self.max_noise_std)[0],
            blur_sigma=self._uniform(0.0, self.max_blur_sigma)[0],
            bias=tuple(self._uniform(-self.max_bias, self.max_bias, 4)),
        )

    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        parameters = self.draw()
        if parameters is None:
            return slices
        return apply_augmentation(slices, parameters, generator=self.generator)
