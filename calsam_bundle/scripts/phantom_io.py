"""Atomic writes of the phantom's NIfTI and JSON files.

Each file is written to a hidden temporary name in its destination folder and then moved over the final name
with ``os.replace``, so a reader never sees a partly written file. Because the generator is deterministic, two
processes that build the same phantom at once (for example every rank of a distributed run) write identical
content, and the last ``os.replace`` wins harmlessly.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

# NIfTI xform code 1 (scanner anatomical): each case is a simulated acquisition, and its deformed anatomy is no
# longer exactly in MNI space (code 4), so the world frame is that of the simulated scanner.
XFORM_CODE_SCANNER = 1


def _temporary_path(path: Path, suffix: str) -> Path:
    # A unique hidden name in the same folder, so os.replace stays a rename on one file system.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{suffix}")


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a 3D volume as NIfTI-1 with qform and sform set to ``affine`` (code 1) and units in mm.

    Args:
        array: (H, W, D) volume; its dtype is kept on disk (float32 images, uint8 labels).
        affine: (4, 4) voxel-to-world matrix.
        path: destination, ending in ``.nii.gz`` for a gzip-compressed file.
    """
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=XFORM_CODE_SCANNER)
    image.set_sform(affine, code=XFORM_CODE_SCANNER)
    image.header.set_xyzt_units(xyz="mm")
    image.set_data_dtype(array.dtype)

    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    temporary = _temporary_path(path, suffix)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(data: object, path: Path) -> None:
    """Write ``data`` as indented JSON to ``path``."""
    temporary = _temporary_path(path, ".json")
    try:
        temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    """Return the JSON object stored at ``path``, or None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
