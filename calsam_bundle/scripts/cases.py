"""Read datalists and volumes, and prepare each case once: regions, boxes and frozen slice embeddings.

A prepared case keeps only the slices that carry a target (plus ``slice_margin`` neighbours) in embedded form,
because slices without a target get no prompt and need no decoder call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from tqdm import tqdm

from .datalist_checks import replace_nonfinite
from .embedding_store import EmbeddingStore
from .prompts import boxes_from_masks
from .regions import check_label_values, get_convention, label_to_regions
from .sam_input import scale_intensity_to_255

logger = logging.getLogger(__name__)


def load_datalist(path: str | Path, section: str = "training") -> list[dict]:
    """Read an MSD-style datalist and resolve relative ``image``/``label`` paths against its folder.

    Raises:
        FileNotFoundError: the datalist is missing.
        ValueError: the section is missing or an entry lacks ``image``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Datalist {str(path)!r} not found; pass an MSD-style JSON with a {section!r} list.")
    content = json.loads(path.read_text())
    if section not in content or not isinstance(content[section], list):
        raise ValueError(f"Datalist {str(path)!r} has no list {section!r}; found keys {sorted(content)}.")
    items = []
    for position, entry in enumerate(content[section]):
        if "image" not in entry:
            raise ValueError(f"Entry {position} of {str(path)!r} has no 'image' key: {entry}.")
        item = dict(entry)
        for key in ("image", "label", "brain_mask"):
            if key in item and item[key] is not None:
                item[key] = _resolve(item[key], path.parent)
        item.setdefault("case_id", case_id_from_image(item["image"], position))
        items.append(item)
    return items


def _resolve(value, folder: Path):
    if isinstance(value, list | tuple):
        return [_resolve(v, folder) for v in value]
    candidate = Path(value)
    return str(candidate if candidate.is_absolute() else folder / candidate)


def case_id_from_image(image, position: int) -> str:
    """Case name from the (first) image file name without its suffixes, or ``case_<position>`` if that is empty."""
    first = image[0] if isinstance(image, list | tuple) else image
    return Path(first).name.split(".")[0] or f"case_{position}"


def spacing_from_affine(affine: torch.Tensor) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes: the norms of the affine's first three columns."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return tuple(float(v) for v in torch.linalg.norm(affine[:3, :3], dim=0))


def load_case(item: dict, label_convention: str = "brats2021", nonfinite: str = "error") -> dict:
    """Load one case's image ``(C, H, W, D)``, region channels ``(K, H, W, D)`` and brain mask ``(H, W, D)``.

    The brain mask is the ``brain_mask`` file when the item names one, otherwise voxels where any image channel
    is non-zero, which matches skull-stripped data such as BraTS and the phantom. ``nonfinite`` is the policy for
    NaN or infinite image voxels: ``"error"`` raises, ``"zero"`` replaces them by 0 and logs file and count.
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    image = load_image(item["image"], loader)
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    image = replace_nonfinite(plain_tensor(image).float(), nonfinite, item["image"])
    case = {
        "case_id": item["case_id"],
        "domain": item.get("domain", "unknown"),
        "image": image,
        "affine": affine,
        "spacing": spacing_from_affine(affine),
    }
    if item.get("brain_mask"):
        case["brain"] = _load_single_channel(item["brain_mask"], loader, "Brain mask")[0] > 0
    else:
        case["brain"] = (image != 0).any(dim=0)
    if item.get("label"):
        convention = get_convention(label_convention)
        label = _load_single_channel(item["label"], loader, "Label")
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"Label {item['label']!r} has shape {tuple(label.shape[1:])} but image {item['image']!r} has "
                f"{tuple(image.shape[1:])}; image and label must share one voxel grid."
            )
        check_label_values(label, convention, str(item["label"]))
        case["regions"] = label_to_regions(label, convention)
    return case


def load_image(image: str | list[str], loader: LoadImage) -> torch.Tensor:
    """Load an image as ``(C, H, W, D)`` from one 3D file per channel or from one file with channels on axis 4.

    The second layout is the one MONAI Label hands over: a single NIfTI of shape ``(H, W, D, C)``, for example
    the four BraTS modalities. ``loader`` must put channels first (``ensure_channel_first=True``).

    Raises:
        ValueError: naming the files, for any other layout: a 2D or 5D file, files that cannot be stacked (a 4D
            file among 3D ones, different shapes), or a list whose stack is not ``(len(image), H, W, D)``.
    """
    files = [str(path) for path in image] if isinstance(image, list | tuple) else [str(image)]
    expected = "one 3D file per channel, or one 4D file (H, W, D, C) with the channels on its 4th axis"
    try:
        loaded = loader(files if len(files) > 1 else files[0])
    except ValueError as error:
        # MONAI stacks the files of a list with numpy, which rejects arrays of different shapes.
        raise ValueError(
            f"Image files {files} cannot be stacked into one volume ({error}). Expected {expected}."
        ) from error
    if loaded.ndim != 4 or (len(files) > 1 and loaded.shape[0] != len(files)):
        raise ValueError(
            f"Image {files if len(files) > 1 else files[0]!r} loads as shape {tuple(loaded.shape)} (channels first). "
            f"Expected {expected}."
        )
    return loaded


def plain_tensor(loaded) -> torch.Tensor:
    """Return a plain ``torch.Tensor``: MONAI's loader gives a MetaTensor, and ``torch.as_tensor`` keeps that type.

    A MetaTensor that reaches the boxes spreads into the decoder's logits, the loss and the penalties. Its
    ``__torch_function__`` then runs on every operation there, forward and backward, and a training step with FIP
    or CMP took about 20 times as long on the 256 px phantom.
    """
    return loaded.as_tensor() if isinstance(loaded, MetaTensor) else torch.as_tensor(loaded)


def _load_single_channel(path: str, loader: LoadImage, role: str) -> torch.Tensor:
    """Load a label map or mask as ``(1, H, W, D)``, raising ``ValueError`` for several channels or another rank."""
    loaded = plain_tensor(loader(path))
    if loaded.ndim != 4 or loaded.shape[0] != 1:
        raise ValueError(
            f"{role} {str(path)!r} loads as shape {tuple(loaded.shape)} (channels first), but it must be one 3D "
            "volume (H, W, D), or (H, W, D, 1)."
        )
    return loaded


def select_sam_channels(image: torch.Tensor, image_channels: list[int] | None) -> torch.Tensor:
    """Pick the three image channels shown to SAM as RGB; a single-channel image is repeated."""
    c = image.shape[0]
    if image_channels is None:
        image_channels = [0, 0, 0] if c == 1 else list(range(3))
    if len(image_channels) != 3 or any(not 0 <= i < c for i in image_channels):
        raise ValueError(f"image_channels must be 3 indices into the {c} image channels, got {image_channels}.")
    return image[list(image_channels)]


def target_slices(regions: torch.Tensor, margin: int) -> torch.Tensor:
    """Indices of slices along the last axis that contain any region, widened by ``margin`` on each side."""
    present = regions.flatten(0, -2).any(dim=0) if regions.ndim > 1 else regions
    depth = present.shape[0]
    if margin > 0:
        widened = torch.nn.functional.max_pool1d(present[None, None].float(), 2 * margin + 1, 1, margin)
        present = widened[0, 0] > 0
    return torch.arange(depth)[present]


def prepare_case(
    item: dict,
    store: EmbeddingStore,
    *,
    label_convention: str = "brats2021",
    image_channels: list[int] | None = None,
    slice_margin: int = 1,
    percentiles: tuple[float, float] = (0.5, 99.5),
    keep_volume: bool = False,
    embed: bool = True,
    nonfinite: str = "error",
) -> dict:
    """Load a case and embed its target slices; ``nonfinite`` is passed to ``load_case``.

    ``embed=False`` skips the encoder, for training that encodes augmented slices on every step.

    Returns:
        A dict with ``case_id``, ``domain``, ``spacing``, ``affine``, ``shape`` ``(H, W, D)``, ``slice_index``
        ``(T,)``, ``slices`` ``(T, 3, H, W)`` uint8 on the [0, 255] scale, ``embeddings`` ``(T, 256, h, w)``,
        ``regions`` ``(T, K, H, W)`` uint8, ``boxes`` ``(T, K, 4)`` and ``valid`` ``(T, K)``; with
        ``keep_volume`` also ``volume_regions`` ``(K, H, W, D)`` and ``brain`` ``(H, W, D)`` for evaluation.
    """
    case = load_case(item, label_convention, nonfinite)
    if "regions" not in case:
        raise ValueError(f"Case {item['case_id']!r} has no 'label'; training and evaluation need one.")
    regions, brain = case["regions"], case["brain"]
    rgb = scale_intensity_to_255(select_sam_channels(case["image"], image_channels), brain, *percentiles)
    index = target_slices(regions, slice_margin)
    slices = rgb[..., index].permute(3, 0, 1, 2).round().to(torch.uint8)
    slice_regions = regions[..., index].permute(3, 0, 1, 2)
    boxes, valid = boxes_from_masks(slice_regions)
    prepared = {
        "case_id": case["case_id"],
        "domain": case["domain"],
        "spacing": case["spacing"],
        "affine": case["affine"],
        "shape": tuple(regions.shape[1:]),
        "slice_index": index,
        "slices": slices,
        "embeddings": store.get(slices.float()) if len(index) and embed else torch.zeros(0),
        "regions": slice_regions.to(torch.uint8),
        "boxes": boxes,
        "valid": valid,
    }
    if keep_volume:
        prepared["volume_regions"] = regions
        prepared["brain"] = brain
    return prepared


def prepare_cases(items: list[dict], store: EmbeddingStore, description: str = "Preparing cases", **kwargs) -> list:
    """Prepare every item with a progress bar; keyword arguments go to ``prepare_case``."""
    prepared = []
    for item in tqdm(items, desc=description, unit="case"):
        prepared.append(prepare_case(item, store, **kwargs))
    logger.info(
        "%s: %d cases, %d slices embedded, %d reused from the cache.",
        description,
        len(prepared),
        store.computed,
        store.reused,
    )
    return prepared
