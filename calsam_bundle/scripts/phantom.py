"""The CalSAM bundle's embedded data set: an MNI phantom of brain tumour MRI from two simulated scanners.

The anatomy is real (the MNI152 2009a template that nilearn ships). Its deformations, the glioma-like lesions
and both scanners are simulated. ``ensure_phantom`` builds the data set once under a folder and reuses it while
its settings are unchanged:

    root_dir/
        datalist.json                       Medical Segmentation Decathlon style, written last
        imagesTr/<case_id>_<t1|t1ce|t2|flair>.nii.gz   float32
        labelsTr/<case_id>_seg.nii.gz       uint8, BraTS 2021 codes {0, 1, 2, 4}
        paramsTr/<case_id>.json             the case's drawn parameters and the settings hash

Example:
    >>> from scripts.phantom import ensure_phantom
    >>> datalist_path = ensure_phantom("data/phantom", subjects_per_domain=2)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from tqdm.auto import tqdm

from .phantom_anatomy import DEFORMATION_SETTINGS
from .phantom_contrasts import CONTRASTS, INTENSITY_JITTER, LESION_INTENSITY, TISSUE_INTENSITY
from .phantom_io import read_json, save_nifti_atomic, write_json_atomic
from .phantom_lesions import LESION_LABELS, LESION_SETTINGS
from .phantom_scanners import SCANNERS
from .phantom_subject import DOMAINS, case_names, generate_subject
from .phantom_template import validate_resolution

logger = logging.getLogger(__name__)

# Bump whenever a change to the phantom modules changes the generated volumes, so existing folders regenerate.
GENERATOR_VERSION = "1"
DATALIST_NAME = "datalist.json"
IMAGE_FOLDER, LABEL_FOLDER, PARAMETER_FOLDER = "imagesTr", "labelsTr", "paramsTr"
_CASE_FILE = re.compile(r"^phantom_[ab]\d{3,}(_(t1|t1ce|t2|flair|seg)\.nii\.gz|\.json)$")

PROVENANCE = (
    "Real anatomy: the MNI ICBM152 nonlinear symmetric 2009a template (brain mask, grey- and white-matter maps) from "
    "nilearn. Simulated: the smooth deformation of each subject, the T1/T1ce/T2/FLAIR contrasts synthesised from "
    "tissue maps, the glioma-like lesion and its labels, and both scanners (transfer curve, lesion contrast, bias "
    "field, Rician noise, blur). No patient data."
)


def _nilearn_version() -> str:
    # Imported here so that configs importing this module (train.yaml) also load where nilearn is not installed,
    # such as the MONAI Label environment, which never builds the phantom.
    import nilearn

    return nilearn.__version__


def phantom_settings(subjects_per_domain: int, resolution_mm: int, seed: int) -> dict:
    """Return the generator settings whose hash decides whether an existing phantom is reused.

    They include the module constants of the deformation, lesion, contrast and scanner models; changes to
    the code itself are covered by ``GENERATOR_VERSION``.
    """
    return {
        "generator_version": GENERATOR_VERSION,
        "nilearn_version": _nilearn_version(),
        "subjects_per_domain": subjects_per_domain,
        "resolution_mm": resolution_mm,
        "seed": seed,
        "domains": list(DOMAINS),
        "scanners": {name: scanner.to_dict() for name, scanner in SCANNERS.items()},
        "deformation": DEFORMATION_SETTINGS,
        "lesion": LESION_SETTINGS,
        "tissue_intensity": TISSUE_INTENSITY,
        "lesion_intensity": LESION_INTENSITY,
        "intensity_jitter": INTENSITY_JITTER,
    }


def settings_hash(settings: dict) -> str:
    """Return the SHA-256 hex digest of the settings' canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _validate_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def _case_files(case_id: str) -> dict[str, str]:
    """Return the case's file paths relative to the data set root, keyed by contrast, "label" and "parameters"."""
    files = {contrast: f"{IMAGE_FOLDER}/{case_id}_{contrast}.nii.gz" for contrast in CONTRASTS}
    files["label"] = f"{LABEL_FOLDER}/{case_id}_seg.nii.gz"
    files["parameters"] = f"{PARAMETER_FOLDER}/{case_id}.json"
    return files


def _datalist_entry(case_id: str, subject: str, domain: str) -> dict:
    files = _case_files(case_id)
    return {
        "image": [files[contrast] for contrast in CONTRASTS],
        "label": files["label"],
        "case_id": case_id,
        "subject": subject,
        "domain": domain,
        "parameters": files["parameters"],
    }


def _entry_files_exist(root: Path, entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), list):
        return False
    paths = [*entry["image"], entry.get("label"), entry.get("parameters")]
    return all(isinstance(path, str) and (root / path).is_file() for path in paths)


def _is_complete(root: Path, digest: str, expected_cases: list[str]) -> bool:
    datalist = read_json(root / DATALIST_NAME)
    if datalist is None:
        return False
    settings = datalist.get("phantom_parameters")
    entries = datalist.get("training")
    if not isinstance(settings, dict) or settings.get("settings_hash") != digest or not isinstance(entries, list):
        return False
    if [entry.get("case_id") if isinstance(entry, dict) else None for entry in entries] != expected_cases:
        return False
    return all(_entry_files_exist(root, entry) for entry in entries)


def _ensure_case(root: Path, seed: int, domain: str, index: int, resolution_mm: int, digest: str) -> dict:
    """Render and write one case unless a previous run with the same settings finished it."""
    case_id, subject = case_names(domain, index)
    entry = _datalist_entry(case_id, subject, domain)
    record = read_json(root / entry["parameters"])
    if record is not None and record.get("settings_hash") == digest and _entry_files_exist(root, entry):
        return entry

    params, images, label, affine = generate_subject(seed, domain, index, resolution_mm)
    files = _case_files(case_id)
    for contrast in CONTRASTS:
        save_nifti_atomic(images[contrast], affine, root / files[contrast])
    save_nifti_atomic(label, affine, root / files["label"])
    # The parameter record goes last: its presence with the current hash marks the case as complete.
    write_json_atomic({"settings_hash": digest, "parameters": params.to_dict()}, root / files["parameters"])
    return entry


def _remove_stale_cases(root: Path, case_ids: set[str]) -> None:
    """Delete phantom case files of earlier settings that the new datalist does not list."""
    for folder in (IMAGE_FOLDER, LABEL_FOLDER, PARAMETER_FOLDER):
        for path in sorted((root / folder).iterdir()):
            if not _CASE_FILE.match(path.name):
                continue
            case_id = re.sub(r"(_(t1|t1ce|t2|flair|seg)\.nii\.gz|\.json)$", "", path.name)
            if case_id not in case_ids:
                logger.info("Removing %s, a phantom case that the current settings no longer generate.", path)
                path.unlink()


def ensure_phantom(
    root_dir: str, subjects_per_domain: int = 12, resolution_mm: int = 2, seed: int = 0, progress: bool = True
) -> str:
    """Build the MNI phantom under ``root_dir`` unless a complete build with the same settings is there.

    A build is complete when ``datalist.json`` stores the hash of the current settings (see
    ``phantom_settings``) and every file it lists exists; then nothing is written. Otherwise the old datalist
    is deleted first, cases already finished with the current settings are kept, the others are rendered, files
    of cases no longer generated are deleted, and the datalist is written last. An interrupted build is thus
    completed by the next call. Subject ``i`` of a domain depends only on ``seed``, the domain, ``i`` and the
    resolution, so adding subjects leaves existing ones unchanged.

    Args:
        root_dir: folder of the data set; created if missing.
        subjects_per_domain: subjects per scanner (``scanner_a`` source, ``scanner_b`` target); at least 1.
        resolution_mm: template voxel size, 1 or 2 mm (2 mm: 99 x 117 x 95 voxels).
        seed: non-negative data set seed.
        progress: show a tqdm progress bar while building.

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: if ``subjects_per_domain`` < 1, ``resolution_mm`` is not 1 or 2, or ``seed`` < 0.
        TypeError: if ``subjects_per_domain`` or ``seed`` is not an int.
    """
    subjects_per_domain = _validate_count("subjects_per_domain", subjects_per_domain, minimum=1)
    resolution_mm = validate_resolution(resolution_mm)
    seed = _validate_count("seed", seed, minimum=0)

    root = Path(root_dir)
    datalist_path = root / DATALIST_NAME
    settings = phantom_settings(subjects_per_domain, resolution_mm, seed)
    digest = settings_hash(settings)
    cases = [(domain, index) for domain in DOMAINS for index in range(subjects_per_domain)]
    if _is_complete(root, digest, [case_names(domain, index)[0] for domain, index in cases]):
        logger.debug("Reusing the MNI phantom at %s (settings hash %s).", root, digest[:12])
        return str(datalist_path)

    logger.info("Building the MNI phantom at %s: %d cases at %d mm, seed %d.", root, len(cases), resolution_mm, seed)
    for folder in (IMAGE_FOLDER, LABEL_FOLDER, PARAMETER_FOLDER):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # A datalist of other settings must not survive while its files are being overwritten.
    datalist_path.unlink(missing_ok=True)

    entries = [
        _ensure_case(root, seed, domain, index, resolution_mm, digest)
        for domain, index in tqdm(cases, desc="MNI phantom", unit="case", disable=not progress)
    ]
    _remove_stale_cases(root, {entry["case_id"] for entry in entries})

    datalist = {
        "name": "CalSAM MNI phantom",
        "description": f"Brain tumour MRI phantom from two simulated scanners. {PROVENANCE}",
        "reference": "MNI ICBM152 nonlinear symmetric 2009a template, as shipped with nilearn " + _nilearn_version(),
        "tensorImageSize": "3D",
        "modality": list(CONTRASTS),
        "labels": {"0": "background", **{str(code): name for code, name in sorted(LESION_LABELS.items())}},
        "numTraining": len(entries),
        "training": entries,
        "phantom_parameters": {**settings, "settings_hash": digest, "provenance": PROVENANCE},
    }
    write_json_atomic(datalist, datalist_path)
    logger.info("Wrote %s.", datalist_path)
    return str(datalist_path)
