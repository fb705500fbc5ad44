"""Prompts for inference: read from a JSON file, derived from a label map, automatic, or from clicks.

Every prompt belongs to one (slice, region) pair of the native voxel array, and ``slice_index`` counts along
the last array axis ``D``. A box is ``[x0, y0, x1, y1]`` in pixel-edge coordinates with ``x`` along the slice's
second axis ``W`` and ``y`` along its first axis ``H``. The box around voxel rows ``r0..r1`` and columns
``c0..c1`` is ``[c0, r0, c1 + 1, r1 + 1]``. A point is ``[x, y]``, the column and row index of the clicked
voxel. Point label 1 marks foreground and 0 background.

Prompt file format (JSON)::

    {"case001": {"40": {"TC": {"box": [30, 22, 51, 40]},
                        "WT": {"box": [25, 18, 58, 47], "points": [[40, 30]], "point_labels": [1]}},
                 "41": {"*": {"points": [[41, 31], [10, 10]], "point_labels": [1, 0]}}}}

Case ids are the keys of the inference items (the image file name without extension by default), slice keys
are decimal slice indices, and region keys are region names of the model's label convention (BraTS: ``TC``,
``WT``, ``ET``; binary: ``lesion``), region indices as strings, or ``*`` for every region.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import boxes_from_masks

ALL_REGIONS = "*"


@dataclass(frozen=True)
class SlicePrompt:
    """Box and/or points of one (slice, region) pair, in native voxel coordinates (see the module docstring)."""

    slice_index: int
    region: int
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        """``box``, ``points``, ``box+points`` or ``none``: pairs of one kind are decoded together."""
        if self.box is not None and self.points:
            return "box+points"
        if self.box is not None:
            return "box"
        return "points" if self.points else "none"


def _region_indices(key: str, region_names: Sequence[str], source: str) -> list[int]:
    if key == ALL_REGIONS:
        return list(range(len(region_names)))
    if key in region_names:
        return [list(region_names).index(key)]
    if key.isdigit() and int(key) < len(region_names):
        return [int(key)]
    raise ValueError(
        f"Prompt file {source}: unknown region {key!r}; use one of {list(region_names)}, an index below "
        f"{len(region_names)}, or {ALL_REGIONS!r} for every region."
    )


def _parse_pair(value: dict, slice_index: int, region: int, source: str) -> SlicePrompt:
    if not isinstance(value, dict) or not {"box", "points"} & set(value):
        raise ValueError(f"Prompt file {source}: expected an object with 'box' and/or 'points', got {value!r}.")
    box = value.get("box")
    if box is not None:
        if len(box) != 4:
            raise ValueError(f"Prompt file {source}: a box is [x0, y0, x1, y1], got {box!r}.")
        box = tuple(float(v) for v in box)
    points = tuple(tuple(float(v) for v in point) for point in value.get("points") or ())
    labels = tuple(int(v) for v in value.get("point_labels", [1] * len(points)))
    if any(len(point) != 2 for point in points) or len(labels) != len(points):
        raise ValueError(
            f"Prompt file {source}: points are [[x, y], ...] with one point label each, got points {points!r} "
            f"and point_labels {labels!r}."
        )
    return SlicePrompt(slice_index, region, box, points, labels)


def parse_case_prompts(entry: dict, region_names: Sequence[str], source: str) -> list[SlicePrompt]:
    """Parse one case's ``{slice: {region: {"box": ..., "points": ..., "point_labels": ...}}}`` mapping."""
    if not isinstance(entry, dict):
        raise ValueError(f"Prompt file {source}: expected an object keyed by slice index, got {type(entry).__name__}.")
    prompts = []
    for slice_key, regions in entry.items():
        if not str(slice_key).lstrip("-").isdigit():
            raise ValueError(f"Prompt file {source}: slice keys are integer indices, got {slice_key!r}.")
        if not isinstance(regions, dict):
            raise ValueError(f"Prompt file {source}, slice {slice_key}: expected an object keyed by region.")
        for region_key, value in regions.items():
            for region in _region_indices(str(region_key), region_names, f"{source}, slice {slice_key}"):
                prompts.append(_parse_pair(value, int(slice_key), region, f"{source}, slice {slice_key}"))
    return prompts


def read_prompt_file(path: str | Path, region_names: Sequence[str]) -> dict[str, list[SlicePrompt]]:
    """Read a prompt file (format in the module docstring) into prompts per case id.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the JSON does not follow the format; the message names the file, slice and value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {str(path)!r} not found; pass prompt_file=<JSON path>.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Prompt file {str(path)!r} is not valid JSON: {error}.") from error
    if not isinstance(content, dict):
        raise ValueError(f"Prompt file {str(path)!r} must be an object keyed by case id.")
    return {
        str(case_id): parse_case_prompts(entry, region_names, f"{path.name}, case {case_id!r}")
        for case_id, entry in content.items()
    }


def prompts_from_regions(regions: torch.Tensor) -> list[SlicePrompt]:
    """Tight box prompts of every region on every slice where it is present, from ``(K, H, W, D)`` masks."""
    boxes, valid = boxes_from_masks(regions.permute(3, 0, 1, 2))  # (D, K, 4), (D, K)
    slice_index, region = valid.nonzero(as_tuple=True)
    return [
        SlicePrompt(int(s), int(k), tuple(float(v) for v in boxes[s, k].tolist()))
        for s, k in zip(slice_index.tolist(), region.tolist())
    ]


def automatic_prompts(brain: torch.Tensor, num_regions: int) -> list[SlicePrompt]:
    """Prompt-free pairs for every region on every slice of a ``(H, W, D)`` brain mask with a brain voxel."""
    slices = brain.flatten(0, 1).any(dim=0).nonzero().flatten().tolist()
    return [SlicePrompt(int(s), k) for s in slices for k in range(num_regions)]


def prompts_from_clicks(
    foreground: Sequence[Sequence[int]],
    background: Sequence[Sequence[int]],
    roi: Sequence[int] | None,
    num_regions: int,
) -> list[SlicePrompt]:
    """Prompts from MONAI Label's interactive request fields, the same prompt for every region.

    Args:
        foreground: ``[[i, j, k], ...]`` clicked voxel indices along the array axes ``(H, W, D)``.
        background: background clicks, same layout.
        roi: ``[i0, j0, i1, j1, k0, k1]`` with exclusive ends (MONAI Label's SAM2 layout), or empty/``None``.
        num_regions: ``K``; every region of a clicked slice gets the clicks and the box.

    Returns:
        One prompt per region on every slice inside the ROI and on every clicked slice. A slice inside the ROI
        gets the box ``[j0, i0, j1, i1]`` and its own clicks; a clicked slice outside it gets the clicks alone.
    """
    clicks: dict[int, list[tuple[tuple[float, float], int]]] = {}
    for label, group in ((1, foreground or []), (0, background or [])):
        for click in group:
            if len(click) != 3:
                raise ValueError(f"A click is [i, j, k] (row, column, slice), got {list(click)!r}.")
            i, j, k = (int(round(float(v))) for v in click)
            clicks.setdefault(k, []).append(((float(j), float(i)), label))
    box_slices: set[int] = set()
    box = None
    if roi:
        if len(roi) != 6:
            raise ValueError(f"roi is [i0, j0, i1, j1, k0, k1] with exclusive ends, got {list(roi)!r}.")
        i0, j0, i1, j1, k0, k1 = (int(v) for v in roi)
        box = (float(j0), float(i0), float(j1), float(i1))
        box_slices = set(range(k0, k1))
    prompts = []
    for slice_index in sorted(box_slices | set(clicks)):
        slice_clicks = clicks.get(slice_index, [])
        points = tuple(point for point, _ in slice_clicks)
        labels = tuple(label for _, label in slice_clicks)
        slice_box = box if slice_index in box_slices else None
        prompts.extend(SlicePrompt(slice_index, k, slice_box, points, labels) for k in range(num_regions))
    return prompts


def check_prompts(prompts: Sequence[SlicePrompt], shape: tuple[int, int, int], num_regions: int, source: str) -> None:
    """Raise a ValueError naming ``source`` if a prompt lies outside the ``(H, W, D)`` volume or repeats a pair."""
    h, w, d = shape
    seen = set()
    for prompt in prompts:
        where = f"{source}, slice {prompt.slice_index}, region {prompt.region}"
        if not 0 <= prompt.slice_index < d:
            raise ValueError(f"{where}: slice index outside 0..{d - 1} of a volume of shape {shape}.")
        if not 0 <= prompt.region < num_regions:
            raise ValueError(f"{where}: region index outside 0..{num_regions - 1}.")
        if (prompt.slice_index, prompt.region) in seen:
            raise ValueError(f"{where}: the pair has two prompts; merge them into one box and one point list.")
        seen.add((prompt.slice_index, prompt.region))
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(
                    f"{where}: box {list(prompt.box)} must satisfy 0 <= x0 < x1 <= {w} (W) and 0 <= y0 < y1 <= {h} "
                    "(H) in pixel-edge voxel coordinates."
                )
        for (x, y), label in zip(prompt.points, prompt.point_labels):
            if not (0 <= x < w and 0 <= y < h) or label not in (0, 1):
                raise ValueError(
                    f"{where}: point [{x}, {y}] with label {label} must lie in 0 <= x < {w}, 0 <= y < {h} and have "
                    "label 1 (foreground) or 0 (background)."
                )
