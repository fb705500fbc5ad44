"""Simulated T1, T1ce, T2 and FLAIR signal from tissue fractions and lesion labels, before any scanner effect.

Each voxel's healthy signal mixes the tissue intensities of its CSF, grey- and white-matter fractions (partial
volume). The relative intensities follow the usual appearance of the four contrasts: white matter brightest on
T1, CSF brightest on T2, CSF suppressed on FLAIR. Lesion voxels take the intensity of their sub-region times the
lesion texture. The signal is split into the healthy image and a lesion difference image, so that a scanner can
scale the lesion contrast on its own. Units are arbitrary, with white matter on T1 near 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .phantom_anatomy import Anatomy
from .phantom_lesions import ENHANCING, NECROSIS, OEDEMA, LesionMaps

CONTRASTS = ("t1", "t1ce", "t2", "flair")
TISSUES = ("csf", "grey_matter", "white_matter")
LESION_REGIONS = {"necrosis": NECROSIS, "enhancing": ENHANCING, "oedema": OEDEMA}

TISSUE_INTENSITY = {
    "t1": {"csf": 0.30, "grey_matter": 0.62, "white_matter": 1.00},
    "t1ce": {"csf": 0.30, "grey_matter": 0.64, "white_matter": 0.96},
    "t2": {"csf": 1.00, "grey_matter": 0.58, "white_matter": 0.42},
    "flair": {"csf": 0.10, "grey_matter": 0.68, "white_matter": 0.52},
}
# Necrosis: fluid-like, dark on T1 and T1ce, bright on T2. Enhancing rim: gadolinium uptake makes it the
# brightest structure on T1ce. Oedema: extra water, dark on T1, bright on T2 and brightest on FLAIR.
LESION_INTENSITY = {
    "t1": {"necrosis": 0.25, "enhancing": 0.55, "oedema": 0.58},
    "t1ce": {"necrosis": 0.28, "enhancing": 1.45, "oedema": 0.60},
    "t2": {"necrosis": 0.95, "enhancing": 0.70, "oedema": 0.85},
    "flair": {"necrosis": 0.45, "enhancing": 0.80, "oedema": 0.98},
}
# Each subject's intensities are the table values times a factor drawn uniformly in [1 - j, 1 + j].
INTENSITY_JITTER = 0.06


@dataclass
class ContrastParameters:
    """Intensities of one subject, ``{contrast: {tissue or lesion region: intensity}}``.

    Attributes:
        tissue_intensity: keys ``CONTRASTS``, then ``TISSUES``.
        lesion_intensity: keys ``CONTRASTS``, then ``LESION_REGIONS``.
    """

    tissue_intensity: dict[str, dict[str, float]]
    lesion_intensity: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        """Return the parameters as JSON-serialisable plain types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ContrastParameters:
        """Build the parameters from ``to_dict`` output."""
        return cls(**data)


def _jitter(rng: np.random.Generator, table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        contrast: {
            name: float(value * rng.uniform(1 - INTENSITY_JITTER, 1 + INTENSITY_JITTER)) for name, value in row.items()
        }
        for contrast, row in table.items()
    }


def draw_contrast_parameters(rng: np.random.Generator) -> ContrastParameters:
    """Draw one subject's tissue and lesion intensities around ``TISSUE_INTENSITY`` and ``LESION_INTENSITY``."""
    return ContrastParameters(
        tissue_intensity=_jitter(rng, TISSUE_INTENSITY), lesion_intensity=_jitter(rng, LESION_INTENSITY)
    )


def synthesise_contrasts(
    anatomy: Anatomy, lesion: LesionMaps, params: ContrastParameters
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Compute the healthy signal and the lesion difference of every contrast.

    Args:
        anatomy: tissue fractions of the subject, each (H, W, D).
        lesion: labels and texture on the same grid.
        params: the subject's intensities.

    Returns:
        ``(healthy, lesion_difference)``, two dicts keyed by ``CONTRASTS`` of float32 (H, W, D) arrays.
        ``healthy + lesion_difference`` is the signal with the lesion; the difference is 0 outside the lesion.
        Both are 0 outside the brain mask.
    """
    fractions = {"csf": anatomy.csf, "grey_matter": anatomy.grey_matter, "white_matter": anatomy.white_matter}
    regions = {name: lesion.label == code for name, code in LESION_REGIONS.items()}

    healthy: dict[str, np.ndarray] = {}
    difference: dict[str, np.ndarray] = {}
    for contrast in CONTRASTS:
        signal = np.zeros(anatomy.brain_mask.shape, dtype=np.float32)
        for tissue in TISSUES:
            signal += np.float32(params.tissue_intensity[contrast][tissue]) * fractions[tissue]
        change = np.zeros_like(signal)
        for name, inside in regions.items():
            lesion_signal = np.float32(params.lesion_intensity[contrast][name]) * lesion.texture[inside]
            change[inside] = lesion_signal - signal[inside]
        healthy[contrast] = signal
        difference[contrast] = change
    return healthy, difference
