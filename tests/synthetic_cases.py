"""Tiny BraTS-like NIfTI cases with spherical lesions, written for tests in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")


def _sphere(shape, centre, radius, spacing):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    distance = np.linalg.norm((grid - np.asarray(centre)) * np.asarray(spacing), axis=-1)
    return distance <= radius


def write_cases(
    folder: str | Path,
    count: int = 4,
    shape: tuple[int, int, int] = (40, 48, 24),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    domains: tuple[str, ...] = ("scanner_a", "scanner_b"),
    seed: int = 0,
) -> str:
    """Write ``count`` cases alternating between ``domains`` and return the datalist path.

    Each case is an ellipsoidal "brain" with a spherical lesion: necrotic core (1) inside an enhancing rim (4)
    inside oedema (2), BraTS 2021 codes. Domain index ``i`` scales intensities by ``1 + 0.5 i``.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    centre_brain = [n / 2 for n in shape]
    brain = _sphere(shape, centre_brain, min(n * s for n, s in zip(shape, spacing)) * 0.45, spacing)
    entries = []
    for index in range(count):
        domain = domains[index % len(domains)]
        centre = [c + rng.uniform(-3, 3) for c in centre_brain]
        label = np.zeros(shape, dtype=np.uint8)
        label[_sphere(shape, centre, 14.0, spacing)] = 2
        label[_sphere(shape, centre, 9.0, spacing)] = 4
        label[_sphere(shape, centre, 5.0, spacing)] = 1
        label[~brain] = 0
        case_id = f"case{index:03d}"
        images = []
        for number, modality in enumerate(MODALITIES):
            contrast = np.where(label == 4, 2.0, np.where(label == 2, 1.5, np.where(label == 1, 0.5, 1.0)))
            values = (contrast * (100.0 + 20 * number) + rng.normal(0, 5, shape)) * brain
            values *= 1.0 + 0.5 * domains.index(domain)
            path = folder / "images" / f"{case_id}_{modality}.nii.gz"
            nib.save(nib.Nifti1Image(values.astype(np.float32), affine), path)
            images.append(str(path.relative_to(folder)))
        label_path = folder / "labels" / f"{case_id}_seg.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), label_path)
        entries.append(
            {
                "image": images,
                "label": str(label_path.relative_to(folder)),
                "case_id": case_id,
                "subject": f"subject{index:03d}",
                "domain": domain,
            }
        )
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}, indent=2))
    return str(datalist)
