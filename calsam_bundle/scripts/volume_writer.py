"""Write NIfTI outputs on the voxel grid of an input image, and JSON sidecars, each atomically.

An output gets the input's affine, qform and sform with their codes, and its voxel size. Its array is the
network's native array, never resampled or reoriented. Each file is written under a temporary name in the
target folder and renamed, so a killed run leaves either a complete file or none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic_files import temporary_sibling


def reference_geometry(path: str | Path) -> dict:
    """Read the affine, qform/sform matrices and codes, spatial shape and units of a NIfTI file."""
    image = nib.load(str(path))
    header = image.header
    return {
        "affine": image.affine.copy(),
        "qform": header.get_qform(),
        "qform_code": int(header["qform_code"]),
        "sform": header.get_sform(),
        "sform_code": int(header["sform_code"]),
        "shape": tuple(int(n) for n in image.shape[:3]),
        "zooms": tuple(float(z) for z in header.get_zooms()[:3]),
        "units": header.get_xyzt_units(),
    }


def _atomic_target(path: Path, suffix: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_sibling(path, suffix)
    os.close(handle)
    return temporary


def write_nifti_like(array: np.ndarray, geometry: dict, path: str | Path, dtype=np.float32) -> Path:
    """Write ``(H, W, D)`` or ``(H, W, D, K)`` ``array`` with the geometry of ``reference_geometry``.

    Raises:
        ValueError: the first three axes of ``array`` differ from the reference shape.
    """
    path = Path(path)
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(geometry["shape"]):
        raise ValueError(
            f"Output {path.name} has shape {array.shape[:3]} but its reference image has {geometry['shape']}; "
            "outputs must stay on the input voxel grid."
        )
    image = nib.Nifti1Image(array.astype(dtype, copy=False), geometry["affine"])
    header = image.header
    header.set_data_dtype(dtype)
    header.set_zooms(tuple(geometry["zooms"]) + (1.0,) * (array.ndim - 3))
    header.set_xyzt_units(*geometry["units"])
    # Copy both transforms with their codes; a code of 0 means "unknown" and must stay 0 rather than be filled in.
    image.set_qform(geometry["qform"], code=geometry["qform_code"])
    image.set_sform(geometry["sform"], code=geometry["sform_code"])
    suffix = "".join(path.suffixes) or ".nii.gz"
    temporary = _atomic_target(path, suffix)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(content: dict, path: str | Path) -> Path:
    """Write ``content`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    temporary = _atomic_target(path, ".json")
    try:
        Path(temporary).write_text(json.dumps(content, indent=2, default=str) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
