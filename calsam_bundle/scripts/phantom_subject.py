"""One phantom subject: real MNI152 anatomy, simulated deformation, lesion and scanner.

``draw_subject`` draws every random parameter from a generator seeded by ``(seed, domain, index)``, so subject
``index`` of a domain stays the same whatever the number of subjects. ``render_subject`` is deterministic: a
subject replays exactly from ``SubjectParameters.from_dict(json.load(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .phantom_anatomy import Anatomy, DeformationParameters, deform_template, draw_deformation
from .phantom_contrasts import ContrastParameters, draw_contrast_parameters, synthesise_contrasts
from .phantom_lesions import LesionMaps, LesionParameters, draw_lesion, render_lesion
from .phantom_scanners import AcquisitionParameters, acquire, draw_acquisition
from .phantom_template import load_template_tissue, validate_resolution

DOMAINS = ("scanner_a", "scanner_b")


@dataclass
class SubjectParameters:
    """Everything needed to render one case.

    Attributes:
        case_id: file name stem, for example ``phantom_a003``.
        subject: subject id, unique across domains, for example ``sub-a003``.
        domain: ``scanner_a`` (source) or ``scanner_b`` (target).
        resolution_mm: voxel size of the template grid, 1 or 2.
        deformation, contrast, lesion, acquisition: parameters of each step.
    """

    case_id: str
    subject: str
    domain: str
    resolution_mm: int
    deformation: DeformationParameters
    contrast: ContrastParameters
    lesion: LesionParameters
    acquisition: AcquisitionParameters

    def to_dict(self) -> dict:
        """Return the parameters as JSON-serialisable plain types."""
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "domain": self.domain,
            "resolution_mm": self.resolution_mm,
            "deformation": self.deformation.to_dict(),
            "contrast": self.contrast.to_dict(),
            "lesion": self.lesion.to_dict(),
            "acquisition": self.acquisition.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> SubjectParameters:
        """Build the parameters from ``to_dict`` output."""
        return cls(
            case_id=data["case_id"],
            subject=data["subject"],
            domain=data["domain"],
            resolution_mm=data["resolution_mm"],
            deformation=DeformationParameters.from_dict(data["deformation"]),
            contrast=ContrastParameters.from_dict(data["contrast"]),
            lesion=LesionParameters.from_dict(data["lesion"]),
            acquisition=AcquisitionParameters.from_dict(data["acquisition"]),
        )


@dataclass
class Scene:
    """Scanner-independent part of a subject: anatomy, lesion and the signal of each contrast.

    Attributes:
        anatomy: deformed tissue fractions.
        lesion: labels (H, W, D) uint8 and texture.
        healthy: healthy signal per contrast, (H, W, D) float32.
        lesion_difference: lesion minus healthy signal per contrast, (H, W, D) float32.
    """

    anatomy: Anatomy
    lesion: LesionMaps
    healthy: dict[str, np.ndarray]
    lesion_difference: dict[str, np.ndarray]


def case_names(domain: str, index: int) -> tuple[str, str]:
    """Return ``(case_id, subject)`` of subject ``index`` of ``domain``, such as ``("phantom_b002", "sub-b002")``."""
    letter = domain.rsplit("_", 1)[-1]
    return f"phantom_{letter}{index:03d}", f"sub-{letter}{index:03d}"


def _draw_subject_and_anatomy(
    seed: int, domain: str, index: int, resolution_mm: int
) -> tuple[SubjectParameters, Anatomy]:
    if domain not in DOMAINS:
        raise ValueError(f"Unknown phantom domain {domain!r}; expected one of {DOMAINS}.")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed!r}, index={index!r}.")
    resolution_mm = validate_resolution(resolution_mm)
    template = load_template_tissue(resolution_mm)
    rng = np.random.default_rng([seed, DOMAINS.index(domain), index])

    deformation = draw_deformation(rng, template)
    contrast = draw_contrast_parameters(rng)
    acquisition = draw_acquisition(rng, domain)
    # The lesion is drawn last because placing it needs the deformed brain.
    anatomy = deform_template(template, deformation)
    lesion = draw_lesion(rng, anatomy)

    case_id, subject = case_names(domain, index)
    params = SubjectParameters(case_id, subject, domain, resolution_mm, deformation, contrast, lesion, acquisition)
    return params, anatomy


def draw_subject(seed: int, domain: str, index: int, resolution_mm: int = 2) -> SubjectParameters:
    """Draw all random parameters of subject ``index`` of ``domain``.

    Args:
        seed: non-negative data set seed.
        domain: one of ``DOMAINS``; it selects the scanner and, with ``index``, the subject's anatomy and lesion.
        index: non-negative subject number within the domain.
        resolution_mm: 1 or 2. The lesion centre is chosen on this grid, so the two resolutions give the same
            deformation, intensities and scanner draws but may place the lesion differently.

    Returns:
        The subject's parameters.

    Raises:
        ValueError: if ``domain`` or ``resolution_mm`` is not supported, or ``seed`` or ``index`` is negative.
    """
    return _draw_subject_and_anatomy(seed, domain, index, resolution_mm)[0]


def _scene_from_anatomy(params: SubjectParameters, anatomy: Anatomy) -> Scene:
    lesion = render_lesion(params.lesion, anatomy)
    healthy, difference = synthesise_contrasts(anatomy, lesion, params.contrast)
    return Scene(anatomy=anatomy, lesion=lesion, healthy=healthy, lesion_difference=difference)


def render_scene(params: SubjectParameters) -> Scene:
    """Render the scanner-independent part of a subject (deterministic)."""
    anatomy = deform_template(load_template_tissue(params.resolution_mm), params.deformation)
    return _scene_from_anatomy(params, anatomy)


def image_scene(scene: Scene, acquisition: AcquisitionParameters) -> dict[str, np.ndarray]:
    """Image a scene with the scanner of ``acquisition``; returns float32 (H, W, D) images per contrast."""
    spacing = np.abs(np.diag(scene.anatomy.affine)[:3])
    return acquire(scene.healthy, scene.lesion_difference, scene.anatomy.brain_mask, spacing, acquisition)


def render_subject(params: SubjectParameters) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Render a subject (deterministic).

    Args:
        params: from ``draw_subject`` or read back from JSON.

    Returns:
        ``(images, label, affine)``: images keyed by contrast, each (H, W, D) float32; label (H, W, D) uint8 in
        BraTS 2021 codes {0, 1, 2, 4}; the template's (4, 4) affine.
    """
    scene = render_scene(params)
    return image_scene(scene, params.acquisition), scene.lesion.label, scene.anatomy.affine


def generate_subject(
    seed: int, domain: str, index: int, resolution_mm: int = 2
) -> tuple[SubjectParameters, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Draw and render a subject, deforming the template once instead of twice.

    Returns:
        ``(params, images, label, affine)``, equal to ``draw_subject`` followed by ``render_subject``.
    """
    params, anatomy = _draw_subject_and_anatomy(seed, domain, index, resolution_mm)
    scene = _scene_from_anatomy(params, anatomy)
    return params, image_scene(scene, params.acquisition), scene.lesion.label, scene.anatomy.affine
