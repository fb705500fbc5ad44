"""Placement of the simulated lesion: a random centre deep enough in the deformed brain."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .phantom_anatomy import Anatomy

# Minimum white-matter fraction at the centre.
MIN_WHITE_MATTER_AT_CENTRE = 0.5


def choose_lesion_centre(
    rng: np.random.Generator, anatomy: Anatomy, needed_depth_mm: float
) -> tuple[list[float], str, float]:
    """Draw a lesion centre at least ``needed_depth_mm`` from the brain surface.

    The hemisphere and a depth quantile are drawn first. The allowed centres are the voxels on that side that
    are in white matter and deep enough. The chosen one sits at the drawn quantile of their depths
    (0 shallowest, 1 deepest). When no voxel qualifies, the white-matter rule and then the side are dropped.

    Args:
        rng: the subject's generator.
        anatomy: the deformed subject.
        needed_depth_mm: minimum distance from the centre to the nearest voxel outside the brain mask.

    Returns:
        ``(centre_mm, hemisphere, depth_quantile)``: a voxel centre in world mm, "left" or "right", and the
        drawn quantile.

    Raises:
        RuntimeError: if no voxel of the brain is deep enough.
    """
    spacing = np.abs(np.diag(anatomy.affine)[:3])
    # The distance transform runs on the mask's bounding box plus one background voxel on each side, which
    # gives the same distances as the whole grid in less time.
    box = []
    for a in range(3):
        occupied = np.flatnonzero(anatomy.brain_mask.any(axis=tuple(b for b in range(3) if b != a)))
        box.append(slice(max(occupied[0] - 1, 0), occupied[-1] + 2))
    depth = np.zeros(anatomy.brain_mask.shape)
    depth[tuple(box)] = ndimage.distance_transform_edt(anatomy.brain_mask[tuple(box)], sampling=spacing)
    hemisphere = "right" if rng.uniform() < 0.5 else "left"
    depth_quantile = float(rng.uniform())

    h, w, d = anatomy.brain_mask.shape
    world_x = (anatomy.affine[0, 3] + anatomy.affine[0, 0] * np.arange(h)).reshape(h, 1, 1)
    # RAS: positive x is the subject's right.
    on_side = (world_x > 0) if hemisphere == "right" else (world_x < 0)
    deep_enough = depth >= needed_depth_mm
    # Gliomas grow mostly in white matter; relax that, then the side, only when nothing fits.
    for allowed in (
        deep_enough & on_side & (anatomy.white_matter >= MIN_WHITE_MATTER_AT_CENTRE),
        deep_enough & on_side,
        deep_enough,
    ):
        candidates = np.flatnonzero(allowed)
        if candidates.size:
            break
    else:
        raise RuntimeError(
            f"No voxel of the deformed brain lies at least {needed_depth_mm:.1f} mm from its surface, so a lesion core "
            "of this size does not fit. Lower WHOLE_TUMOUR_RADIUS_RANGE_MM in phantom_lesions.py."
        )

    order = np.argsort(depth.ravel()[candidates], kind="stable")
    chosen = candidates[order[int(round(depth_quantile * (candidates.size - 1)))]]
    voxel = np.array(np.unravel_index(chosen, (h, w, d)), dtype=np.float64)
    centre = anatomy.affine[:3, :3] @ voxel + anatomy.affine[:3, 3]
    return centre.tolist(), hemisphere, depth_quantile
