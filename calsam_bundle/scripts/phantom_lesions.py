"""Simulated glioma-like lesion with BraTS 2021 sub-region labels.

The lesion is a perturbed ellipsoid in three nested zones: necrotic core (label 1) innermost, enhancing rim
(label 4) around it, oedema (label 2) outermost. In the lesion's own frame, a point ``q`` is the offset from
the centre, rotated and divided by the whole-tumour semi-axes. It lies in a zone when ``|q|`` is below that
zone's radius times ``1 + g(q / |q|)``. Here ``g`` is a smooth random function of the direction, a sum of a few
sine waves along random directions. The core and the oedema have separate functions, so the oedema spreads
irregularly around the core, and further into white matter than into cortex. Oedema never covers voxels that
are mostly CSF, and no label leaves the brain mask. Mass effect and infiltration along fibre tracts are not
simulated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .phantom_anatomy import Anatomy
from .phantom_lesion_placement import MIN_WHITE_MATTER_AT_CENTRE, choose_lesion_centre

NECROSIS = 1
OEDEMA = 2
ENHANCING = 4
LESION_LABELS = {NECROSIS: "necrotic core", OEDEMA: "oedema", ENHANCING: "enhancing tumour"}

WHOLE_TUMOUR_RADIUS_RANGE_MM = (12.0, 30.0)
CORE_RATIO_RANGE = (0.55, 0.8)
NECROSIS_RATIO_RANGE = (0.45, 0.7)
AXIS_LOG_RANGE = 0.2
CORE_SHAPE_MODES = 4
CORE_MODE_AMPLITUDE_MAX = 0.08
OEDEMA_SHAPE_MODES = 6
OEDEMA_MODE_AMPLITUDE_MAX = 0.1
MODE_FREQUENCY_RANGE = (2.0, 6.0)
# The oedema boundary is scaled by 1 + preference * (white-matter fraction - 0.5): oedema reaches further
# into white matter than into cortex, which gives it finger-like edges along the gyri.
OEDEMA_WHITE_MATTER_PREFERENCE = 0.6
TEXTURE_AMPLITUDE_RANGE = (0.05, 0.15)
TEXTURE_SIGMA_MM = 3.0
CENTRE_MARGIN_MM = 3.0
MAX_CSF_IN_OEDEMA = 0.5
LESION_SETTINGS = {
    "whole_tumour_radius_range_mm": WHOLE_TUMOUR_RADIUS_RANGE_MM,
    "core_ratio_range": CORE_RATIO_RANGE,
    "necrosis_ratio_range": NECROSIS_RATIO_RANGE,
    "axis_log_range": AXIS_LOG_RANGE,
    "core_shape_modes": CORE_SHAPE_MODES,
    "core_mode_amplitude_max": CORE_MODE_AMPLITUDE_MAX,
    "oedema_shape_modes": OEDEMA_SHAPE_MODES,
    "oedema_mode_amplitude_max": OEDEMA_MODE_AMPLITUDE_MAX,
    "mode_frequency_range": MODE_FREQUENCY_RANGE,
    "oedema_white_matter_preference": OEDEMA_WHITE_MATTER_PREFERENCE,
    "texture_amplitude_range": TEXTURE_AMPLITUDE_RANGE,
    "texture_sigma_mm": TEXTURE_SIGMA_MM,
    "centre_margin_mm": CENTRE_MARGIN_MM,
    "min_white_matter_at_centre": MIN_WHITE_MATTER_AT_CENTRE,
    "max_csf_in_oedema": MAX_CSF_IN_OEDEMA,
}


@dataclass
class LesionParameters:
    """Parameters of one lesion. Lengths in world millimetres (RAS), ratios unitless.

    Attributes:
        centre_mm: lesion centre, a voxel centre of the subject's grid, length 3.
        hemisphere: "left" or "right", the side the centre was drawn in (recorded for reports).
        depth_quantile: position of the centre among the allowed centres ordered by distance to the brain
            surface, 0 shallowest, 1 deepest (recorded for reports).
        whole_tumour_radius_mm: nominal radius of the oedema's outer boundary: the geometric mean of the
            ellipsoid's semi-axes before the boundary perturbation and the clipping to the brain.
        core_ratio: radius of the tumour core (necrosis plus enhancing rim) over the whole-tumour radius.
        necrosis_ratio: radius of the necrotic core over the tumour core radius.
        axis_factors: ellipsoid semi-axis factors, geometric mean 1, length 3.
        rotation_deg: orientation of the ellipsoid, angles about x, y, z (extrinsic, degrees).
        core_shape: sine modes of the core boundary, see ``draw_shape_modes``.
        oedema_shape: sine modes of the oedema boundary.
        texture_amplitude: relative standard deviation of the smooth intensity texture inside the lesion.
        texture_seed: seed of the texture's Gaussian noise.
    """

    centre_mm: list[float]
    hemisphere: str
    depth_quantile: float
    whole_tumour_radius_mm: float
    core_ratio: float
    necrosis_ratio: float
    axis_factors: list[float]
    rotation_deg: list[float]
    core_shape: dict
    oedema_shape: dict
    texture_amplitude: float
    texture_seed: int

    def to_dict(self) -> dict:
        """Return the parameters as JSON-serialisable plain types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LesionParameters:
        """Build the parameters from ``to_dict`` output."""
        return cls(**data)

    def max_extent_mm(self) -> float:
        """Return an upper bound of the distance from the centre to any lesion voxel."""
        oedema_bound = _shape_bound(self.oedema_shape) * (1.0 + OEDEMA_WHITE_MATTER_PREFERENCE / 2)
        shape = max(_shape_bound(self.core_shape) * self.core_ratio, oedema_bound)
        return self.whole_tumour_radius_mm * max(self.axis_factors) * shape

    def core_extent_mm(self) -> float:
        """Return an upper bound of the distance from the centre to any tumour-core voxel."""
        return self.whole_tumour_radius_mm * max(self.axis_factors) * self.core_ratio * _shape_bound(self.core_shape)


@dataclass
class LesionMaps:
    """Rendered lesion on the subject grid.

    Attributes:
        label: BraTS 2021 codes {0, 1, 2, 4}, shape (H, W, D), uint8.
        texture: multiplicative intensity texture, 1 outside the lesion, shape (H, W, D), float32.
    """

    label: np.ndarray
    texture: np.ndarray


def draw_shape_modes(rng: np.random.Generator, count: int, amplitude_max: float) -> dict:
    """Draw ``count`` sine modes ``a * sin(f * (d . n) + phi)`` of a boundary perturbation over directions n.

    Returns:
        ``{"directions": (count, 3) unit vectors, "frequencies", "phases", "amplitudes"}`` as lists.
    """
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return {
        "directions": directions.tolist(),
        "frequencies": rng.uniform(*MODE_FREQUENCY_RANGE, size=count).tolist(),
        "phases": rng.uniform(0.0, 2.0 * np.pi, size=count).tolist(),
        "amplitudes": rng.uniform(0.0, amplitude_max, size=count).tolist(),
    }


def _shape_bound(modes: dict) -> float:
    return 1.0 + float(np.sum(modes["amplitudes"]))


def _shape_factor(modes: dict, unit: np.ndarray) -> np.ndarray:
    """Evaluate ``1 + g`` for unit direction vectors of shape (3, ...)."""
    factor = np.ones(unit.shape[1:])
    for direction, frequency, phase, amplitude in zip(
        modes["directions"], modes["frequencies"], modes["phases"], modes["amplitudes"]
    ):
        projection = np.tensordot(np.asarray(direction), unit, axes=1)
        factor += amplitude * np.sin(frequency * projection + phase)
    return factor


def draw_lesion(rng: np.random.Generator, anatomy: Anatomy) -> LesionParameters:
    """Draw a lesion that fits the subject's brain.

    The size and shape are drawn first. The centre is then a voxel whose distance to the brain surface exceeds
    the core's largest radius plus 3 mm, so the tumour core lies inside the brain. ``choose_lesion_centre``
    describes the hemisphere, depth and white-matter rules.

    Args:
        rng: the subject's generator.
        anatomy: the deformed subject the lesion is placed in.

    Returns:
        Parameters for ``render_lesion``.
    """
    log_axes = rng.uniform(-AXIS_LOG_RANGE, AXIS_LOG_RANGE, size=3)
    axis_factors = np.exp(log_axes - log_axes.mean())
    params = LesionParameters(
        centre_mm=[0.0, 0.0, 0.0],
        hemisphere="",
        depth_quantile=0.0,
        whole_tumour_radius_mm=float(rng.uniform(*WHOLE_TUMOUR_RADIUS_RANGE_MM)),
        core_ratio=float(rng.uniform(*CORE_RATIO_RANGE)),
        necrosis_ratio=float(rng.uniform(*NECROSIS_RATIO_RANGE)),
        axis_factors=axis_factors.tolist(),
        rotation_deg=rng.uniform(-180.0, 180.0, size=3).tolist(),
        core_shape=draw_shape_modes(rng, CORE_SHAPE_MODES, CORE_MODE_AMPLITUDE_MAX),
        oedema_shape=draw_shape_modes(rng, OEDEMA_SHAPE_MODES, OEDEMA_MODE_AMPLITUDE_MAX),
        texture_amplitude=float(rng.uniform(*TEXTURE_AMPLITUDE_RANGE)),
        texture_seed=int(rng.integers(2**31)),
    )
    centre, hemisphere, depth_quantile = choose_lesion_centre(rng, anatomy, params.core_extent_mm() + CENTRE_MARGIN_MM)
    params.centre_mm, params.hemisphere, params.depth_quantile = centre, hemisphere, depth_quantile
    return params


def render_lesion(params: LesionParameters, anatomy: Anatomy) -> LesionMaps:
    """Render the lesion labels and intensity texture on the subject grid.

    Only a box around the centre that contains the ball of radius ``params.max_extent_mm()`` is computed.

    Args:
        params: from ``draw_lesion`` or read back from JSON.
        anatomy: the deformed subject; its brain mask and CSF fraction clip the lesion.

    Returns:
        The label volume and texture.

    Raises:
        RuntimeError: if a sub-region came out empty. The centre is a voxel deep inside the brain, so the
            necrotic core always contains it. The rim and the oedema were non-empty in all 300 draws tried at 2 mm.
    """
    spacing = np.abs(np.diag(anatomy.affine)[:3])
    centre = np.asarray(params.centre_mm)
    centre_voxel = (centre - anatomy.affine[:3, 3]) / np.diag(anatomy.affine)[:3]
    reach = np.ceil(params.max_extent_mm() / spacing) + 1
    low = np.maximum(np.floor(centre_voxel - reach), 0).astype(int)
    high = np.minimum(np.ceil(centre_voxel + reach) + 1, anatomy.brain_mask.shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(low, high))

    grids = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(low, high)], indexing="ij")
    offset = np.stack([anatomy.affine[a, 3] + anatomy.affine[a, a] * grids[a] - centre[a] for a in range(3)])
    rotation = Rotation.from_euler("xyz", params.rotation_deg, degrees=True).as_matrix()
    semi_axes = params.whole_tumour_radius_mm * np.asarray(params.axis_factors)
    # Lesion frame: rotate world offsets into the ellipsoid axes, then the whole tumour is the unit ball.
    local = np.tensordot(rotation.T, offset, axes=1) / semi_axes.reshape(3, 1, 1, 1)
    radius = np.linalg.norm(local, axis=0)
    unit = local / np.maximum(radius, 1e-9)

    core_boundary = params.core_ratio * _shape_factor(params.core_shape, unit)
    white_matter_scale = 1.0 + OEDEMA_WHITE_MATTER_PREFERENCE * (anatomy.white_matter[box] - 0.5)
    oedema_boundary = _shape_factor(params.oedema_shape, unit) * white_matter_scale
    in_brain = anatomy.brain_mask[box]
    oedema = (radius < oedema_boundary) & in_brain & (anatomy.csf[box] < MAX_CSF_IN_OEDEMA)
    core = (radius < core_boundary) & in_brain
    necrosis = (radius < params.necrosis_ratio * core_boundary) & in_brain

    label_box = np.zeros(radius.shape, dtype=np.uint8)
    label_box[oedema] = OEDEMA
    label_box[core] = ENHANCING
    label_box[necrosis] = NECROSIS
    present = set(np.unique(label_box).tolist())
    if not {NECROSIS, OEDEMA, ENHANCING} <= present:
        raise RuntimeError(f"Lesion sub-regions came out empty (labels present: {sorted(present)}) for {params}.")

    noise = np.random.default_rng(params.texture_seed).standard_normal(radius.shape)
    smooth = ndimage.gaussian_filter(noise, sigma=TEXTURE_SIGMA_MM / spacing)
    smooth /= max(float(smooth.std()), 1e-12)
    texture_box = np.clip(1.0 + params.texture_amplitude * smooth, 0.5, 1.5)

    label = np.zeros(anatomy.brain_mask.shape, dtype=np.uint8)
    label[box] = label_box
    texture = np.ones(anatomy.brain_mask.shape, dtype=np.float32)
    texture[box] = np.where(label_box > 0, texture_box, 1.0)
    return LesionMaps(label=label, texture=texture)
