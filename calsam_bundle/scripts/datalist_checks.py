"""Check every file of a datalist before training or evaluation, and report all problems in one error.

Real data sets contain missing, truncated and inconsistent files. A run that stops at the first bad case after an
hour of embedding wastes the hour and reveals one problem per restart, so :func:`check_datalist` reads every file
first and raises one :class:`DatalistError` that lists each file and reason. Per file the header (shape, affine,
qform and sform) is read first. The voxel data is read once, and only when the header is sound, to find
non-finite values, label codes and empty labels. Content checks need NIfTI (``.nii``, ``.nii.gz``), so files in
other formats are checked for existence only.

Non-finite image voxels follow the ``nonfinite`` policy: ``"error"`` reports them, ``"zero"`` lets
:func:`replace_nonfinite` set them to 0 when the case is loaded, logging the file and voxel count.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError

from .regions import LabelConvention, get_convention

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "zero")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Errors nibabel raises for damaged files: truncated gzip streams (EOFError), short uncompressed files (OSError),
# corrupt deflate data (zlib.error), headers it cannot parse (ImageFileError, ValueError).
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


@dataclass(frozen=True)
class DatalistProblem:
    """One problem found in a datalist entry: the case, the file (None for the entry itself) and the reason."""

    case_id: str
    path: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.case_id}: {self.path}" if self.path else str(self.case_id)
        return f"{where}: {self.reason}"


class DatalistError(ValueError):
    """Error raised by :func:`check_datalist`; its ``problems`` attribute contains every problem found, in order."""

    def __init__(self, problems: list[DatalistProblem], total_cases: int) -> None:
        self.problems = list(problems)
        cases = len({problem.case_id for problem in problems})
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"The datalist check found {len(problems)} problem(s) in {cases} of {total_cases} cases; fix or remove "
            f"these entries and run again:\n{lines}"
        )


@dataclass
class DatalistSummary:
    """Counts of the cases and files :func:`check_datalist` read, and the non-finite voxels per file to replace."""

    cases: int = 0
    files: int = 0
    nonfinite_voxels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _CheckOptions:
    convention: LabelConvention
    image_channels: tuple[int, ...] | None
    require_label: bool
    allow_empty_label: bool
    nonfinite: str
    affine_tolerance: float


def check_nonfinite_policy(policy: str) -> str:
    """Return ``policy`` if it is one of :data:`NONFINITE_POLICIES`; raise a ValueError otherwise."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}.")
    return policy


def replace_nonfinite(image: torch.Tensor, policy: str, source: str | Sequence[str]) -> torch.Tensor:
    """Apply the non-finite policy to a loaded ``(C, H, W, D)`` image.

    Args:
        image: the image tensor.
        policy: ``"error"`` raises on any NaN or infinite voxel; ``"zero"`` replaces them by 0 and logs a warning
            with the file and count.
        source: the image file, or one file per channel, named in the error and the log.

    Raises:
        ValueError: ``policy`` is ``"error"`` and the image has non-finite voxels, or ``policy`` is unknown.
    """
    check_nonfinite_policy(policy)
    finite = torch.isfinite(image)
    if bool(finite.all()):
        return image
    per_channel = (~finite).flatten(1).sum(dim=1).tolist()
    if isinstance(source, str) or len(source) != len(per_channel):
        counts = {str(source): sum(per_channel)}
    else:
        counts = {str(path): count for path, count in zip(source, per_channel) if count}
    if policy == "error":
        raise ValueError(
            f"Non-finite voxels (NaN or infinite) in {counts} (file: count). Fix the files, or set "
            "preprocessing#nonfinite: zero to replace them by 0."
        )
    for path, count in counts.items():
        logger.warning("Replaced %d non-finite voxels (NaN or infinite) by 0 in %s.", count, path)
    return torch.where(finite, image, torch.zeros((), dtype=image.dtype))


def check_datalist(
    items: list[dict],
    *,
    label_convention: str = "brats2021",
    image_channels: Sequence[int] | None = None,
    require_label: bool = True,
    allow_empty_label: bool = False,
    nonfinite: str = "error",
    affine_tolerance: float = 1e-3,
    num_workers: int | None = None,
) -> DatalistSummary:
    """Check every file of every entry and raise one error listing all problems.

    Each entry is checked for:

    - missing files, and unreadable or truncated NIfTI files;
    - a 4D file among per-modality 3D files, a volume with more than 4 dimensions, or too few channels for
      ``image_channels``;
    - image, label and brain mask shapes or affines that disagree by more than ``affine_tolerance``;
    - qform and sform that disagree by more than ``affine_tolerance``;
    - NaN or infinite image voxels, unless ``nonfinite="zero"``;
    - label values outside ``label_convention``, and a missing or empty label where one is required.

    Args:
        items: entries from ``cases.load_datalist`` (``image``, optional ``label`` and ``brain_mask``, ``case_id``).
        label_convention: name of the label convention the label values must follow.
        image_channels: image channel indices the preprocessing selects, or None for its default (channel 0
            repeated for one channel, the first three otherwise).
        require_label: report entries without a ``label``.
        allow_empty_label: accept labels without any region voxel; they give no prompt, so training learns nothing
            from them.
        nonfinite: ``"error"`` reports non-finite image voxels; ``"zero"`` logs them for replacement at loading.
        affine_tolerance: maximum absolute difference of affine entries in mm (rotation entries in mm per voxel).
        num_workers: threads reading files; gzip decompression releases the GIL. None uses up to 4.

    Returns:
        A :class:`DatalistSummary`.

    Raises:
        DatalistError: with every problem found (a ValueError).
        ValueError: on an unknown ``label_convention`` or ``nonfinite`` policy.
    """
    options = _CheckOptions(
        convention=get_convention(label_convention),
        image_channels=None if image_channels is None else tuple(int(i) for i in image_channels),
        require_label=bool(require_label),
        allow_empty_label=bool(allow_empty_label),
        nonfinite=check_nonfinite_policy(nonfinite),
        affine_tolerance=float(affine_tolerance),
    )
    workers = num_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda item: _check_case(item, options), items))

    summary = DatalistSummary(cases=len(items))
    problems: list[DatalistProblem] = []
    for case_problems, files, nonfinite_counts in results:
        problems.extend(case_problems)
        summary.files += files
        summary.nonfinite_voxels.update(nonfinite_counts)
    if problems:
        raise DatalistError(problems, len(items))
    for path, count in summary.nonfinite_voxels.items():
        logger.warning("%s has %d non-finite voxels (NaN or infinite); they will be replaced by 0.", path, count)
    logger.info("Datalist check passed: %d cases, %d files.", summary.cases, summary.files)
    return summary


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(n) for n in shape[:3])


def _check_case(item: dict, options: _CheckOptions) -> tuple[list[DatalistProblem], int, dict[str, int]]:
    case_id = str(item.get("case_id", item.get("image")))
    problems: list[DatalistProblem] = []
    nonfinite_counts: dict[str, int] = {}

    def report(path: str | None, reason: str) -> None:
        problems.append(DatalistProblem(case_id, path, reason))

    image_paths = _as_list(item["image"])
    roles = [("image", path) for path in image_paths]
    if item.get("label"):
        roles.append(("label", str(item["label"])))
    elif options.require_label:
        report(None, "the entry has no 'label'; training and evaluation need one per case")
    if item.get("brain_mask"):
        roles.append(("brain_mask", str(item["brain_mask"])))

    headers: dict[str, nib.Nifti1Image] = {}
    for role, path in roles:
        if not Path(path).is_file():
            report(path, f"{role} file not found")
            continue
        if not path.endswith(NIFTI_SUFFIXES):
            logger.info("%s is not NIfTI; the datalist check only verified that it exists.", path)
            continue
        try:
            headers[path] = nib.load(path)
        except _READ_ERRORS as error:
            report(path, f"unreadable NIfTI header ({error}); the file is damaged or not NIfTI, re-export it")

    _check_dimensions(image_paths, roles, headers, options, report)
    _check_grids(roles, headers, options.affine_tolerance, report)

    for role, path in roles:
        if path not in headers:
            continue
        try:
            data = np.asanyarray(headers[path].dataobj)
        except _READ_ERRORS as error:
            report(path, f"unreadable or truncated NIfTI data ({error}); re-export or copy the file again")
            continue
        if role == "image":
            count = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind in "fc" else 0
            if count and options.nonfinite == "error":
                report(path, f"{count} non-finite voxels (NaN or infinite); fix the file or set nonfinite: zero")
            elif count:
                nonfinite_counts[path] = count
        elif role == "label":
            _check_label_data(data, path, options, report)
    return problems, len(roles), nonfinite_counts


def _check_dimensions(image_paths, roles, headers, options: _CheckOptions, report) -> None:
    channels = 0
    for role, path in roles:
        if path not in headers:
            continue
        shape = tuple(headers[path].shape)
        trailing_one = len(shape) == 4 and shape[3] == 1
        if role == "image" and len(image_paths) == 1:
            if len(shape) not in (3, 4):
                report(path, f"image has shape {shape}; expected a 3D volume or a 4D (H, W, D, C) volume")
            channels = shape[3] if len(shape) == 4 else 1
        elif role == "image":
            if len(shape) != 3 and not trailing_one:
                report(
                    path,
                    f"image has shape {shape}, a 4D volume where one 3D modality file is expected; split its "
                    "channels into separate files or give the 4D file alone as 'image'",
                )
            channels += 1
        elif len(shape) != 3 and not trailing_one:
            report(path, f"{role} has shape {shape}; expected a 3D volume")
    if len(image_paths) > 1 and not all(path in headers for path in image_paths):
        return
    if channels and options.image_channels is not None:
        if any(not 0 <= index < channels for index in options.image_channels):
            report(
                image_paths[0] if len(image_paths) == 1 else None,
                f"image_channels {list(options.image_channels)} selects channels the case lacks: it has {channels}",
            )
    elif channels == 2:
        report(None, "the image has 2 channels; set image_channels to choose 3 of them (indices may repeat)")


def _check_grids(roles, headers, tolerance: float, report) -> None:
    reference_path = next((path for role, path in roles if role == "image" and path in headers), None)
    for role, path in roles:
        if path not in headers:
            continue
        image = headers[path]
        qform, qform_code = image.header.get_qform(coded=True)
        sform, sform_code = image.header.get_sform(coded=True)
        if qform_code > 0 and sform_code > 0:
            difference = float(np.abs(qform - sform).max())
            if difference > tolerance:
                report(
                    path,
                    f"qform and sform disagree by {difference:.4g} mm (tolerance {tolerance:g}); nibabel and MONAI use "
                    "the sform, ITK-based tools the qform. Make them equal (e.g. nibabel set_qform(sform)) or zero "
                    "the wrong code",
                )
        if reference_path is None or path == reference_path:
            continue
        reference = headers[reference_path]
        if _spatial(image.shape) != _spatial(reference.shape):
            report(
                path,
                f"{role} shape {_spatial(image.shape)} differs from {_spatial(reference.shape)} of {reference_path}; "
                "all files of a case must share one voxel grid",
            )
            continue
        difference = float(np.abs(image.affine - reference.affine).max())
        if difference > tolerance:
            report(
                path,
                f"{role} affine differs from that of {reference_path} by {difference:.4g} mm (tolerance "
                f"{tolerance:g}); resample the files onto one grid or fix the header",
            )


def _check_label_data(data: np.ndarray, path: str, options: _CheckOptions, report) -> None:
    values = np.unique(data)
    allowed = np.array(sorted(options.convention.codes), dtype=np.float64)
    unexpected = [v.item() for v in values if not np.isin(v, allowed)]
    if unexpected:
        listed = ", ".join(f"{v:g}" for v in unexpected[:10]) + (", ..." if len(unexpected) > 10 else "")
        report(
            path,
            f"label values [{listed}] are outside the {options.convention.name!r} convention (allowed "
            f"{sorted(options.convention.codes)}); choose the matching label_convention or fix the label",
        )
    if not options.allow_empty_label and not np.any(data != 0):
        report(path, "label is empty (no region voxel), so the case gives no prompt; remove it or fix the label")
