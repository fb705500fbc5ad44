"""Two simulated MRI scanners that turn the phantom's signal into the images a site would store.

A scanner model fixes, per domain: the lesion contrast scale, the point-spread blur, the strength of the
multiplicative bias field, the Rician noise level, and the intensity transfer curve
``output_scale * gain * signal ** gamma`` of its reconstruction. ``draw_acquisition`` draws a bias field, a gain
and a noise seed around that model. ``acquire`` applies them deterministically, then zeroes the background as
BraTS skull stripping does. Neither scanner imitates a real vendor.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .phantom_contrasts import CONTRASTS


@dataclass(frozen=True)
class ScannerModel:
    """Fixed properties of one simulated scanner.

    Attributes:
        name: domain name written in the datalist.
        description: one line for reports.
        gamma: exponent of the intensity transfer curve; below 1 lifts dark tissue and compresses contrast.
        output_scale: stored intensity of signal 1 (white matter on T1) at gain 1.
        gain_jitter: each acquisition's gain is drawn uniformly in [1 - gain_jitter, 1 + gain_jitter].
        lesion_contrast: factor on the lesion difference signal per contrast; 1 keeps the simulated lesion
            intensities, below 1 moves the lesion toward the surrounding tissue.
        bias_coefficient_max: the bias field is ``exp`` of a polynomial of degree 1 to 3 in coordinates
            normalised to [-1, 1] over the field of view, whose 19 coefficients are drawn uniformly in
            [-bias_coefficient_max, bias_coefficient_max].
        noise_std: standard deviation of the Gaussian noise on the real and imaginary channels, in signal units
            (white matter on T1 near 1). Taking the magnitude makes the noise Rician.
        blur_sigma_mm: Gaussian point-spread sigma per axis in mm (the last axis is the slice axis).
    """

    name: str
    description: str
    gamma: float
    output_scale: float
    gain_jitter: float
    lesion_contrast: dict[str, float]
    bias_coefficient_max: float
    noise_std: float
    blur_sigma_mm: tuple[float, float, float]

    def to_dict(self) -> dict:
        """Return the model as JSON-serialisable plain types."""
        return asdict(self)


SCANNERS = {
    "scanner_a": ScannerModel(
        name="scanner_a",
        description="source domain: linear transfer, full lesion contrast, weak bias field, low noise, sharp",
        gamma=1.0,
        output_scale=1000.0,
        gain_jitter=0.05,
        lesion_contrast={"t1": 1.0, "t1ce": 1.0, "t2": 1.0, "flair": 1.0},
        bias_coefficient_max=0.05,
        noise_std=0.02,
        blur_sigma_mm=(0.5, 0.5, 0.5),
    ),
    "scanner_b": ScannerModel(
        name="scanner_b",
        description="target domain: gamma 0.7 transfer, weaker enhancement, strong bias field, noisier, thick slices",
        gamma=0.7,
        output_scale=400.0,
        gain_jitter=0.05,
        lesion_contrast={"t1": 0.85, "t1ce": 0.6, "t2": 0.85, "flair": 0.75},
        bias_coefficient_max=0.2,
        noise_std=0.05,
        blur_sigma_mm=(1.0, 1.0, 2.0),
    ),
}

# Exponents (a, b, c) of the bias polynomial's terms x^a y^b z^c, constant term excluded (the gain plays it).
BIAS_MONOMIALS = tuple(exponents for exponents in itertools.product(range(4), repeat=3) if 1 <= sum(exponents) <= 3)


@dataclass
class AcquisitionParameters:
    """Random part of one acquisition.

    Attributes:
        scanner: key of ``SCANNERS``.
        gain: global intensity factor.
        bias_coefficients: one per term of ``BIAS_MONOMIALS``, in that order.
        noise_seed: seed of the noise; contrast ``i`` of ``CONTRASTS`` uses ``default_rng([noise_seed, i])``,
            whose normal draws fill the brain voxels in C order, real channel first.
    """

    scanner: str
    gain: float
    bias_coefficients: list[float]
    noise_seed: int

    def to_dict(self) -> dict:
        """Return the parameters as JSON-serialisable plain types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AcquisitionParameters:
        """Build the parameters from ``to_dict`` output."""
        return cls(**data)


def get_scanner(name: str) -> ScannerModel:
    """Return the scanner model of a domain name, or raise ValueError naming the known ones."""
    if name not in SCANNERS:
        raise ValueError(f"Unknown phantom scanner {name!r}; expected one of {sorted(SCANNERS)}.")
    return SCANNERS[name]


def draw_acquisition(rng: np.random.Generator, scanner_name: str) -> AcquisitionParameters:
    """Draw the gain, bias field and noise seed of one acquisition on scanner ``scanner_name``."""
    scanner = get_scanner(scanner_name)
    limit = scanner.bias_coefficient_max
    return AcquisitionParameters(
        scanner=scanner.name,
        gain=float(rng.uniform(1 - scanner.gain_jitter, 1 + scanner.gain_jitter)),
        bias_coefficients=rng.uniform(-limit, limit, size=len(BIAS_MONOMIALS)).tolist(),
        noise_seed=int(rng.integers(2**31)),
    )


def bias_field(coefficients: list[float], shape: tuple[int, int, int]) -> np.ndarray:
    """Evaluate the multiplicative bias field on a grid.

    Args:
        coefficients: one per term of ``BIAS_MONOMIALS``.
        shape: grid shape (H, W, D). Coordinates run from -1 at the first voxel to 1 at the last, so the field
            covers the same anatomy at 1 and 2 mm.

    Returns:
        ``exp(polynomial)``, shape (H, W, D), float32.
    """
    powers = [np.linspace(-1.0, 1.0, n)[np.newaxis, :] ** np.arange(4)[:, np.newaxis] for n in shape]
    polynomial = np.zeros((4, 4, 4))
    for coefficient, exponents in zip(coefficients, BIAS_MONOMIALS):
        polynomial[exponents] = coefficient
    # Tensor-product evaluation: sum over (a, b, c) of coefficient * x^a * y^b * z^c.
    log_field = np.einsum("ai,bj,ck,abc->ijk", *powers, polynomial, optimize=True)
    return np.exp(log_field).astype(np.float32)


def acquire(
    healthy: dict[str, np.ndarray],
    lesion_difference: dict[str, np.ndarray],
    brain_mask: np.ndarray,
    spacing_mm: np.ndarray,
    acquisition: AcquisitionParameters,
) -> dict[str, np.ndarray]:
    """Image the signal with the acquisition's scanner.

    Per contrast: lesion contrast scale, Gaussian blur, bias field, Rician noise, transfer curve, then 0 outside
    the brain mask.

    Args:
        healthy: healthy signal per contrast, (H, W, D) float32, from ``synthesise_contrasts``.
        lesion_difference: lesion difference per contrast, (H, W, D) float32.
        brain_mask: (H, W, D) bool.
        spacing_mm: voxel size per axis, shape (3,).
        acquisition: from ``draw_acquisition``.

    Returns:
        Images keyed by ``CONTRASTS``, (H, W, D) float32, non-negative.
    """
    scanner = get_scanner(acquisition.scanner)
    shading = bias_field(acquisition.bias_coefficients, brain_mask.shape)
    sigma_voxels = np.asarray(scanner.blur_sigma_mm) / np.asarray(spacing_mm)
    scale = np.float32(scanner.output_scale * acquisition.gain)
    noise_std = np.float32(scanner.noise_std)

    # Noise and the transfer curve are computed on brain voxels only, because the background is zeroed anyway.
    shading = shading[brain_mask]
    images: dict[str, np.ndarray] = {}
    for index, contrast in enumerate(CONTRASTS):
        signal = healthy[contrast] + np.float32(scanner.lesion_contrast[contrast]) * lesion_difference[contrast]
        signal = ndimage.gaussian_filter(signal, sigma=sigma_voxels)[brain_mask] * shading
        noise = np.random.default_rng([acquisition.noise_seed, index])
        real = signal + noise_std * noise.standard_normal(signal.shape, dtype=np.float32)
        imaginary = noise_std * noise.standard_normal(signal.shape, dtype=np.float32)
        magnitude = np.sqrt(real * real + imaginary * imaginary)
        image = np.zeros(brain_mask.shape, dtype=np.float32)
        image[brain_mask] = scale * magnitude ** np.float32(scanner.gamma)
        images[contrast] = image
    return images
