"""Prompted prediction on a whole native volume, with no resampling, and the per-voxel predictive entropy.

Training embeds only the slices that carry a label, so inference selects its own slices: those with a prompt.
Each prompted (slice, region) pair is decoded on the native slice grid. As in evaluation, every voxel of a
region on a slice without a prompt for that region keeps probability 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .cases import select_sam_channels
from .prompt_files import SlicePrompt
from .sam_input import scale_intensity_to_255

logger = logging.getLogger(__name__)

# SAM's prompt encoder reads point label -1 as "no point", which pads point lists to one length per batch.
PADDING_POINT_LABEL = -1


def volume_to_sam_slices(
    image: torch.Tensor,
    brain: torch.Tensor,
    image_channels: Sequence[int] | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
) -> torch.Tensor:
    """Scale ``(C, H, W, D)`` intensities to SAM's ``(3, H, W, D)`` input as training does (``cases.prepare_case``).

    Values are rounded to integers on [0, 255] because training embeds uint8 slices.
    """
    rgb = scale_intensity_to_255(select_sam_channels(image.float(), image_channels), brain.bool(), *percentiles)
    return rgb.round()


def _points_tensor(chunk: Sequence[SlicePrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the chunk's points into ``(P, N, 2)`` and labels into ``(P, N)``, padding with "no point" entries."""
    n = max(len(prompt.points) for prompt in chunk)
    points = torch.zeros((len(chunk), n, 2), dtype=torch.float32)
    labels = torch.full((len(chunk), n), PADDING_POINT_LABEL, dtype=torch.int64)
    for row, prompt in enumerate(chunk):
        if prompt.points:
            points[row, : len(prompt.points)] = torch.tensor(prompt.points, dtype=torch.float32)
            labels[row, : len(prompt.points)] = torch.tensor(prompt.point_labels, dtype=torch.int64)
    return points, labels


@torch.no_grad()
def predict_prompted_volume(
    network: torch.nn.Module,
    sam_slices: torch.Tensor,
    prompts: Sequence[SlicePrompt],
    num_regions: int,
    *,
    temperature: Sequence[float] | None = None,
    pair_batch: int = 32,
    encode_batch: int = 8,
) -> dict:
    """Encode the prompted slices once and decode every prompted (slice, region) pair.

    Args:
        network: a ``CalSAMNet``.
        sam_slices: ``(3, H, W, D)`` SAM input on [0, 255] from ``volume_to_sam_slices``.
        prompts: one ``SlicePrompt`` per decoded pair, checked with ``prompt_files.check_prompts``.
        num_regions: ``K``.
        temperature: ``(K,)`` calibration temperatures dividing each region's logits, or ``None``.
        pair_batch: pairs per decoder call, to bound memory.
        encode_batch: slices per encoder call.

    Returns:
        ``prob`` ``(K, H, W, D)`` float32 in [0, 1] and ``decoded`` ``(K, D)`` bool, True on the (region, slice)
        pairs that were decoded.
    """
    _, h, w, d = sam_slices.shape
    device = next(network.parameters()).device
    prob = torch.zeros((num_regions, h, w, d), dtype=torch.float32)
    decoded = torch.zeros((num_regions, d), dtype=torch.bool)
    if not prompts:
        return {"prob": prob, "decoded": decoded}
    scale = None if temperature is None else torch.as_tensor(temperature, dtype=torch.float32)

    slices = sorted({prompt.slice_index for prompt in prompts})
    row_of_slice = {slice_index: row for row, slice_index in enumerate(slices)}
    embeddings = network.encode(sam_slices[..., slices].permute(3, 0, 1, 2).to(device)).float()
    logger.debug("Encoded %d slices for %d prompted pairs.", len(slices), len(prompts))

    # The prompt encoder takes one prompt layout per call, so pairs are grouped by the kind of prompt they carry.
    for kind in ("box", "points", "box+points", "none"):
        group = [prompt for prompt in prompts if prompt.kind == kind]
        for start in range(0, len(group), pair_batch):
            chunk = group[start : start + pair_batch]
            rows = torch.tensor([row_of_slice[prompt.slice_index] for prompt in chunk], device=device)
            regions = torch.tensor([prompt.region for prompt in chunk], device=device)
            boxes = points = labels = None
            if "box" in kind:
                boxes = torch.tensor([prompt.box for prompt in chunk], dtype=torch.float32, device=device)
            if "points" in kind:
                points, labels = (tensor.to(device) for tensor in _points_tensor(chunk))
            logits = network(
                embeddings[rows], regions, boxes=boxes, points=points, point_labels=labels, native_hw=(h, w)
            )
            logits = logits.squeeze(1).float().cpu()
            for prompt, pair_logits in zip(chunk, logits):
                if scale is not None:
                    pair_logits = pair_logits / scale[prompt.region]
                prob[prompt.region, :, :, prompt.slice_index] = torch.sigmoid(pair_logits)
                decoded[prompt.region, prompt.slice_index] = True
    return {"prob": prob, "decoded": decoded}


def bernoulli_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Compute the entropy in nats of independent Bernoulli voxels, ``-p ln p - (1 - p) ln(1 - p)``, 0 at p in {0, 1}.

    The maximum, ``ln 2 = 0.693`` nats (1 bit), is reached at p = 0.5.
    """
    prob = prob.clamp(0.0, 1.0)
    return -(torch.special.xlogy(prob, prob) + torch.special.xlogy(1.0 - prob, 1.0 - prob))
