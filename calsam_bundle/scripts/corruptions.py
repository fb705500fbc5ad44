"""Corruption suite ("-C"): write corrupted copies of test cases once and reuse them.

Layout under ``output_dir``:

    <corruption>/severity<k>/<case_id>/<image file names of the case>   float32, the source file's affine and header
    <corruption>/severity<k>/<case_id>/record.json                      parameters, seeds and input files, written last
    brain_masks/<case_id>_brain.nii.gz                                  uint8 brain mask of the clean image
    manifest.json                                                       the suite's levels and seeding rule

A level's files are reused while its ``record.json`` matches the current record: TorchIO version, transform and
parameters, seeds, and the path, size and modification time of every input file. Any difference rewrites them.

The corruptions spread intensity into the background, so the brain mask of a corrupted image cannot be taken from
its non-zero voxels. Each returned item therefore names the clean image's brain mask (non-zero voxels of any
channel, as ``scripts.cases.load_case`` computes it) unless the item already has a ``brain_mask``. Evaluation then
uses the same voxel sets and intensity normalisation region on clean and corrupted images.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from tqdm.auto import tqdm

from .corruption_levels import (
    CORRUPTIONS,
    SCALE_PERCENTILE,
    SEVERITIES,
    apply_level,
    check_level,
    corruption_seed,
    level_parameters,
)
from .phantom_io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["CORRUPTIONS", "SEVERITIES", "ensure_corrupted"]

# Bump when a change to this module or corruption_levels.py changes the written voxels, so old files are rewritten.
SUITE_VERSION = "1"
RECORD_NAME = "record.json"
MASK_FOLDER = "brain_masks"
_SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def ensure_corrupted(
    items: list[dict],
    output_dir,
    *,
    corruptions=CORRUPTIONS,
    severities=SEVERITIES,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Write corrupted copies of the images of ``items`` once and return one datalist item per corruption level.

    Pass test cases only: the suite measures robustness of a trained model, and corrupted copies of training
    cases would leak the clean anatomy into the comparison. The draw of a level depends only on
    ``(seed, case_id, corruption)`` (see ``scripts.corruption_levels``), so severities of one case and corruption
    share one realisation at increasing strength, and results do not depend on the order of the request.

    Args:
        items: entries as ``scripts.cases.load_datalist`` returns them (absolute paths, ``image`` a list of
            modality files or one 3D or 4D file, ``label``, ``case_id``, domain keys).
        output_dir: folder of the corrupted files; created if missing.
        corruptions: names from ``CORRUPTIONS``.
        severities: levels from ``SEVERITIES``.
        seed: suite seed.
        progress: show a tqdm progress bar while writing.

    Returns:
        Items ordered by input item, then corruption, then severity: copies of the input item with ``image`` on
        the corrupted file(s), the same ``label``, ``case_id`` ``f"{case_id}__{corruption}{severity}"``, and the
        added keys ``corruption``, ``severity``, ``source_case_id`` and (if absent) ``brain_mask``.

    Raises:
        ValueError: an unknown corruption or severity, a case id unusable as a folder name, a repeated case id,
            or modality files of different shapes.
        FileNotFoundError: an image file is missing.
    """
    corruptions = tuple(corruptions)
    severities = tuple(int(s) for s in severities)
    for corruption in corruptions:
        for severity in severities:
            check_level(corruption, severity)
    _check_case_ids(items)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _write_manifest(output, seed)

    results, written, reused = [], 0, 0
    bar = tqdm(
        total=len(items) * len(corruptions) * len(severities),
        desc="Corrupting test cases",
        unit="volume",
        disable=not progress,
    )
    for item in items:
        sources = _image_paths(item)
        inputs = [_file_state(path) for path in sources]
        levels = [(c, s) for c in corruptions for s in severities]
        pending = [(c, s) for c, s in levels if not _is_current(output, item, c, s, seed, inputs)]
        loaded = _load_image(sources) if pending else None
        mask_path = output / MASK_FOLDER / f"{item['case_id']}_brain.nii.gz"
        if loaded is not None or not mask_path.is_file():
            loaded = loaded or _load_image(sources)
            _save_atomic(loaded["brain"].numpy().astype(np.uint8), loaded["headers"][0], mask_path)
        for corruption, severity in levels:
            folder = _level_folder(output, item, corruption, severity)
            if (corruption, severity) in pending:
                _write_level(loaded, folder, item, corruption, severity, seed, inputs)
                written += 1
            else:
                reused += 1
            results.append(_corrupted_item(item, folder, sources, corruption, severity, mask_path))
            bar.update()
    bar.close()
    logger.info("Corruption suite under %s: %d volumes written, %d reused.", output, written, reused)
    return results


def _check_case_ids(items: list[dict]) -> None:
    seen = set()
    for item in items:
        case_id = str(item.get("case_id", ""))
        if not _SAFE_CASE_ID.match(case_id):
            raise ValueError(
                f"case_id {case_id!r} cannot name a folder of the corruption suite; use letters, digits, '.', '_' "
                "and '-' only, starting with a letter or digit."
            )
        if case_id in seen:
            raise ValueError(f"case_id {case_id!r} appears twice in the items; corrupted files need unique case ids.")
        seen.add(case_id)


def _image_paths(item: dict) -> list[str]:
    image = item["image"]
    paths = [str(path) for path in image] if isinstance(image, list | tuple) else [str(image)]
    names = _output_names(paths)
    if len(set(names)) != len(names):
        raise ValueError(f"Image files {paths} of case {item['case_id']!r} share a file name; rename them.")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Image file {path!r} of case {item['case_id']!r} not found; fix the datalist.")
    return paths


def _file_state(path: str) -> dict:
    status = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _level_folder(output: Path, item: dict, corruption: str, severity: int) -> Path:
    return output / corruption / f"severity{severity}" / str(item["case_id"])


def _record(item: dict, corruption: str, severity: int, seed: int, inputs: list[dict]) -> dict:
    return {
        "suite_version": SUITE_VERSION,
        "torchio_version": tio.__version__,
        "case_id": item["case_id"],
        "corruption": corruption,
        "severity": severity,
        "seed": int(seed),
        "torch_seed": corruption_seed(seed, item["case_id"], corruption),
        "scale_percentile": SCALE_PERCENTILE,
        **level_parameters(corruption, severity),
        "inputs": inputs,
    }


def _output_names(sources: list[str]) -> list[str]:
    return [Path(path).name for path in sources]


def _is_current(output: Path, item: dict, corruption: str, severity: int, seed: int, inputs: list[dict]) -> bool:
    folder = _level_folder(output, item, corruption, severity)
    stored = read_json(folder / RECORD_NAME)
    if stored != _record(item, corruption, severity, seed, inputs):
        return False
    return all((folder / name).is_file() for name in _output_names([entry["path"] for entry in inputs]))


def _load_image(sources: list[str]) -> dict:
    """Load ``(C, H, W, D)`` float32 from one file per channel or one 3D/4D file, with headers and brain mask."""
    images = [nib.load(path) for path in sources]
    arrays = []
    for path, image in zip(sources, images):
        data = np.asarray(image.get_fdata(dtype=np.float32))
        if data.ndim == 3:
            arrays.append(data[None])
        elif data.ndim == 4 and len(sources) == 1:
            arrays.append(np.moveaxis(data, -1, 0))
        else:
            raise ValueError(f"Image {path!r} has shape {data.shape}; expected 3D files, or one 4D (H, W, D, C) file.")
    shapes = {array.shape[1:] for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"Modality files {sources} have different shapes {sorted(shapes)}; resample them to one grid.")
    image = torch.from_numpy(np.concatenate(arrays, axis=0))
    return {"image": image, "brain": (image != 0).any(dim=0), "headers": images, "ndim": arrays[0].ndim}


def _write_level(loaded: dict, folder: Path, item: dict, corruption: str, severity: int, seed: int, inputs) -> None:
    image, headers = loaded["image"], loaded["headers"]
    record = _record(item, corruption, severity, seed, inputs)
    corrupted = apply_level(image, headers[0].affine, loaded["brain"], corruption, severity, record["torch_seed"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_NAME).unlink(missing_ok=True)
    names = _output_names([entry["path"] for entry in inputs])
    if len(headers) == 1 and headers[0].ndim == 4:
        _save_atomic(np.moveaxis(corrupted.numpy(), 0, -1), headers[0], folder / names[0])
    else:
        for channel, (header, name) in enumerate(zip(headers, names)):
            _save_atomic(corrupted[channel].numpy(), header, folder / name)
    # The record goes last: its presence with the current content marks the level as complete.
    write_json_atomic(record, folder / RECORD_NAME)


def _save_atomic(array: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    """Write ``array`` with the source file's affine and header (qform, sform, units) under a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = source.header.copy()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, source.affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _corrupted_item(item: dict, folder: Path, sources: list[str], corruption: str, severity: int, mask: Path) -> dict:
    corrupted = copy.deepcopy(item)
    names = _output_names(sources)
    if isinstance(item["image"], list | tuple):
        corrupted["image"] = [str(folder / name) for name in names]
    else:
        corrupted["image"] = str(folder / names[0])
    corrupted["case_id"] = f"{item['case_id']}__{corruption}{severity}"
    corrupted["corruption"] = corruption
    corrupted["severity"] = severity
    corrupted["source_case_id"] = item["case_id"]
    if not item.get("brain_mask"):
        corrupted["brain_mask"] = str(mask)
    return corrupted


def _write_manifest(output: Path, seed: int) -> None:
    manifest = {
        "suite_version": SUITE_VERSION,
        "torchio_version": tio.__version__,
        "seed": int(seed),
        "seeding": "torch seed = first 8 bytes of SHA-256('seed/case_id/corruption') modulo 2**31, big-endian",
        "intensity_scale": f"per channel, the {SCALE_PERCENTILE}th percentile of the clean image's non-zero voxels",
        "levels": {c: {str(s): level_parameters(c, s) for s in SEVERITIES} for c in CORRUPTIONS},
    }
    if read_json(output / "manifest.json") != manifest:
        write_json_atomic(manifest, output / "manifest.json")
