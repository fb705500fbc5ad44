"""Tissue maps of the MNI152 2009a template that nilearn ships: the real anatomy of the phantom.

nilearn's wheel contains the skull-stripped ICBM152 nonlinear symmetric 2009a T1 template and its grey- and white-matter
probability maps at 1 mm (197 x 233 x 189 voxels, axis-aligned affine with origin (-98, -134, -72) mm),
so these loaders work offline. Only the anatomy is real; everything the phantom adds to it is simulated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SUPPORTED_RESOLUTIONS_MM = (1, 2)

# Centred binomial kernel: averages each 2 mm voxel with its 1 mm neighbours before taking every second voxel,
# so the 2 mm grid keeps the 1 mm voxel centres (origin unchanged) and fine folds do not alias.
_DOWNSAMPLE_KERNEL = np.array([0.25, 0.5, 0.25])


@dataclass(frozen=True)
class TemplateTissue:
    """Template tissue maps on one voxel grid.

    Attributes:
        grey_matter: grey-matter probability, shape (H, W, D), float32 in [0, 1].
        white_matter: white-matter probability, shape (H, W, D), float32 in [0, 1].
        brain_mask: brain mask as float32 0/1, shape (H, W, D), float so that it can be interpolated when warped.
        affine: voxel-to-world (RAS, mm) matrix, shape (4, 4), axis-aligned.
    """

    grey_matter: np.ndarray
    white_matter: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (H, W, D)."""
        h, w, d = self.grey_matter.shape
        return h, w, d

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along each axis in mm, shape (3,)."""
        return np.abs(np.diag(self.affine)[:3])

    def world_extent_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the world coordinates (mm) of the first and the last voxel centre, each of shape (3,).

        Both resolutions span the same extent, (-98, -134, -72) to (98, 98, 116) mm, so parameters drawn in
        millimetres over this box mean the same at 1 mm and at 2 mm.
        """
        first = self.affine[:3, 3].copy()
        last = first + np.diag(self.affine)[:3] * (np.array(self.shape) - 1)
        return first, last


def validate_resolution(resolution_mm: object) -> int:
    """Return ``resolution_mm`` as an int, or raise ValueError unless it is 1 or 2."""
    if isinstance(resolution_mm, bool) or resolution_mm not in SUPPORTED_RESOLUTIONS_MM:
        raise ValueError(
            f"resolution_mm must be one of {SUPPORTED_RESOLUTIONS_MM} (voxel size of the MNI template in mm), "
            f"got {resolution_mm!r}."
        )
    return int(resolution_mm)


def _downsample_by_two(volume: np.ndarray) -> np.ndarray:
    smoothed = volume
    for axis in range(3):
        smoothed = ndimage.correlate1d(smoothed, _DOWNSAMPLE_KERNEL, axis=axis, mode="nearest")
    return np.ascontiguousarray(smoothed[::2, ::2, ::2])


@functools.lru_cache(maxsize=2)
def load_template_tissue(resolution_mm: int) -> TemplateTissue:
    """Load the template's grey matter, white matter and brain mask at 1 or 2 mm.

    The brain mask is nilearn's ``load_mni152_brain_mask`` (template T1 above 0.2 of its maximum), which
    contains the ventricles. The 2 mm grid keeps every second 1 mm voxel centre after a [1/4, 1/2, 1/4]
    smoothing per axis: shape (99, 117, 95) and the same affine as ``load_mni152_template(resolution=2)``,
    in a fraction of the time nilearn's spline resampling takes. Results are cached per resolution and
    returned read-only, because every subject shares them.

    Args:
        resolution_mm: 1 or 2.

    Returns:
        The tissue maps on the template grid of that resolution.

    Raises:
        ValueError: if ``resolution_mm`` is not 1 or 2.
    """
    # Imported here because nilearn.datasets pulls in scikit-learn (seconds), which reusing a built phantom skips.
    from nilearn import datasets

    resolution_mm = validate_resolution(resolution_mm)
    grey_image = datasets.load_mni152_gm_template(resolution=1)
    grey_matter = grey_image.get_fdata(dtype=np.float32)
    white_matter = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain_mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    affine = grey_image.affine.copy()

    if resolution_mm == 2:
        grey_matter = _downsample_by_two(grey_matter)
        white_matter = _downsample_by_two(white_matter)
        brain_mask = (_downsample_by_two(brain_mask) > 0.5).astype(np.float32)
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])

    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        # The deformation and bias field are built separably along the voxel axes.
        raise ValueError(f"The nilearn MNI152 template must have an axis-aligned affine, got\n{affine}.")

    arrays = [np.clip(grey_matter, 0.0, 1.0), np.clip(white_matter, 0.0, 1.0), brain_mask, affine]
    for array in arrays:
        array.setflags(write=False)
    return TemplateTissue(*arrays)
