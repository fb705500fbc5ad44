"""Smooth random deformation of the template tissue maps: simulated anatomical variety on real anatomy.

A subject is the template pulled back through a small global affine transform (per-axis scale, rotation)
plus a low-frequency displacement field. The field is an interpolating cubic spline through displacement
vectors on a coarse grid of control points, so its wavelength is about the control spacing (30 mm) and its
size a few millimetres. ``draw_deformation`` draws the parameters and ``deform_template`` applies them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import interpolate, ndimage
from scipy.spatial.transform import Rotation

from .phantom_template import TemplateTissue

CONTROL_SPACING_MM = 30.0
SCALE_RANGE = (0.94, 1.06)
ROTATION_RANGE_DEG = 4.0
DISPLACEMENT_STD_RANGE_MM = (1.0, 3.0)
# Clipping at 2.5 standard deviations keeps the largest control-point displacement below 7.5 mm.
DISPLACEMENT_CLIP_STD = 2.5
DEFORMATION_SETTINGS = {
    "control_spacing_mm": CONTROL_SPACING_MM,
    "scale_range": SCALE_RANGE,
    "rotation_range_deg": ROTATION_RANGE_DEG,
    "displacement_std_range_mm": DISPLACEMENT_STD_RANGE_MM,
    "displacement_clip_std": DISPLACEMENT_CLIP_STD,
}


@dataclass
class DeformationParameters:
    """Parameters of one subject's deformation, all in world millimetres (RAS).

    The template point seen at world position ``x`` is
    ``centre + R @ diag(1 / scale) @ (x - centre) + u(x)``, with ``R`` the rotation and ``u`` the spline through
    ``displacement_mm`` at ``control_points_mm``.

    Attributes:
        centre_mm: fixed point of the global transform, length 3.
        scale: brain size factor per axis, length 3; above 1 enlarges the subject.
        rotation_deg: rotation angles about x, y, z (extrinsic, degrees), length 3.
        displacement_std_mm: standard deviation the control-point displacements were drawn with.
        control_points_mm: control-point positions per axis, three lists.
        displacement_mm: displacement vectors at the control points, nested lists of shape (3, nx, ny, nz).
    """

    centre_mm: list[float]
    scale: list[float]
    rotation_deg: list[float]
    displacement_std_mm: float
    control_points_mm: list[list[float]]
    displacement_mm: list

    def to_dict(self) -> dict:
        """Return the parameters as JSON-serialisable plain types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeformationParameters:
        """Build the parameters from ``to_dict`` output (for example read back from JSON)."""
        return cls(**data)


@dataclass
class Anatomy:
    """Tissue fractions of one deformed subject; inside the brain they sum to 1, outside they are 0.

    Attributes:
        grey_matter: shape (H, W, D), float32 in [0, 1].
        white_matter: shape (H, W, D), float32 in [0, 1].
        csf: cerebrospinal fluid, the rest of the brain mask, shape (H, W, D), float32 in [0, 1].
        brain_mask: shape (H, W, D), bool.
        affine: voxel-to-world matrix, shape (4, 4), the template's.
    """

    grey_matter: np.ndarray
    white_matter: np.ndarray
    csf: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray


def draw_deformation(rng: np.random.Generator, template: TemplateTissue) -> DeformationParameters:
    """Draw a random deformation.

    Args:
        rng: the subject's generator.
        template: gives the world extent that the control grid covers. The extent is the same at 1 and 2 mm,
            so the drawn values do not depend on the resolution.

    Returns:
        Parameters for ``deform_template``.
    """
    first, last = template.world_extent_mm()
    centre = (first + last) / 2.0
    counts = [int(np.ceil((b - a) / CONTROL_SPACING_MM)) + 1 for a, b in zip(first, last)]
    control_points = [np.linspace(a, b, n).tolist() for a, b, n in zip(first, last, counts)]

    scale = rng.uniform(*SCALE_RANGE, size=3)
    rotation = rng.uniform(-ROTATION_RANGE_DEG, ROTATION_RANGE_DEG, size=3)
    std = float(rng.uniform(*DISPLACEMENT_STD_RANGE_MM))
    limit = DISPLACEMENT_CLIP_STD * std
    displacement = np.clip(rng.normal(0.0, std, size=(3, *counts)), -limit, limit)

    return DeformationParameters(
        centre_mm=centre.tolist(),
        scale=scale.tolist(),
        rotation_deg=rotation.tolist(),
        displacement_std_mm=std,
        control_points_mm=control_points,
        displacement_mm=displacement.tolist(),
    )


def _spline_weights(nodes: list[float], positions: np.ndarray) -> np.ndarray:
    """Return the (len(positions), len(nodes)) matrix that evaluates the interpolating cubic spline."""
    spline = interpolate.make_interp_spline(np.asarray(nodes), np.eye(len(nodes)), k=3)
    return spline(positions)


def _voxel_world_axes(template: TemplateTissue) -> list[np.ndarray]:
    return [template.affine[a, 3] + template.affine[a, a] * np.arange(n) for a, n in enumerate(template.shape)]


def displacement_field(params: DeformationParameters, template: TemplateTissue) -> np.ndarray:
    """Evaluate the displacement spline on the template grid.

    Returns:
        Displacement in mm, shape (3, H, W, D), float32.
    """
    axes = _voxel_world_axes(template)
    weights = [_spline_weights(nodes, x) for nodes, x in zip(params.control_points_mm, axes)]
    coefficients = np.asarray(params.displacement_mm, dtype=np.float64)
    # Separable tensor product: three small matrix products instead of a 3D spline per voxel.
    field = np.einsum("ia,jb,kc,dabc->dijk", *weights, coefficients, optimize=True)
    return field.astype(np.float32)


def _interpolate(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample ``volume`` trilinearly at voxel coordinates ``points`` of shape (3, N); zero outside the grid."""
    return ndimage.map_coordinates(volume, points, order=1, mode="constant", cval=0.0, output=np.float32)


def deform_template(template: TemplateTissue, params: DeformationParameters) -> Anatomy:
    """Warp the template tissue maps with ``params`` (trilinear interpolation).

    Args:
        template: tissue maps of the grid to render on.
        params: from ``draw_deformation`` or read back from a subject's JSON.

    Returns:
        The subject's tissue fractions on the template grid.
    """
    axes = _voxel_world_axes(template)
    centre = np.asarray(params.centre_mm)
    rotation = Rotation.from_euler("xyz", params.rotation_deg, degrees=True).as_matrix()
    pullback = rotation @ np.diag(1.0 / np.asarray(params.scale))
    displacement = displacement_field(params, template)

    h, w, d = template.shape
    offsets = [
        (axes[0] - centre[0]).reshape(h, 1, 1),
        (axes[1] - centre[1]).reshape(1, w, 1),
        (axes[2] - centre[2]).reshape(1, 1, d),
    ]
    coordinates = np.empty((3, h, w, d), dtype=np.float32)
    for a in range(3):
        world = centre[a] + pullback[a, 0] * offsets[0] + pullback[a, 1] * offsets[1] + pullback[a, 2] * offsets[2]
        coordinates[a] = (world + displacement[a] - template.affine[a, 3]) / template.affine[a, a]
    del displacement

    # Interpolate only where the result can be non-zero: the mask where the pulled-back point falls in the
    # template brain's bounding box, then the tissue maps inside the warped mask, which saves time at 1 mm.
    in_box = np.ones((h, w, d), dtype=bool)
    for a in range(3):
        other_axes = tuple(b for b in range(3) if b != a)
        occupied = np.flatnonzero(template.brain_mask.any(axis=other_axes))
        in_box &= (coordinates[a] >= occupied[0] - 1) & (coordinates[a] <= occupied[-1] + 1)
    brain_mask = np.zeros((h, w, d), dtype=bool)
    brain_mask[in_box] = _interpolate(template.brain_mask, coordinates[:, in_box]) > 0.5

    inside = coordinates[:, brain_mask]
    grey_matter = np.zeros((h, w, d), dtype=np.float32)
    white_matter = np.zeros((h, w, d), dtype=np.float32)
    grey_matter[brain_mask] = np.clip(_interpolate(template.grey_matter, inside), 0.0, 1.0)
    white_matter[brain_mask] = np.clip(_interpolate(template.white_matter, inside), 0.0, 1.0)

    # The probability maps overlap slightly at tissue borders; rescale so that fractions never exceed 1.
    total = grey_matter + white_matter
    excess = total > 1.0
    grey_matter[excess] /= total[excess]
    white_matter[excess] /= total[excess]
    csf = np.clip(brain_mask - grey_matter - white_matter, 0.0, 1.0).astype(np.float32)

    return Anatomy(
        grey_matter=grey_matter,
        white_matter=white_matter,
        csf=csf,
        brain_mask=brain_mask,
        affine=template.affine.copy(),
    )
