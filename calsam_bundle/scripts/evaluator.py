"""Whole-volume prediction from prompted slices, and the evaluator that runs it case by case.

Every (slice, region) pair with a box is decoded; all other voxels of that region are background with
probability exactly 0, because the method never predicts a region on a slice where it was not prompted.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .prompts import box_masks, jitter_boxes


@torch.no_grad()
def predict_volume(
    network: torch.nn.Module,
    case: dict,
    *,
    temperature: torch.Tensor | None = None,
    box_jitter: float = 0.0,
    generator: torch.Generator | None = None,
    pair_batch: int = 32,
) -> dict:
    """Decode a prepared case into region probabilities on its full voxel grid.

    Args:
        network: ``CalSAMNet`` (or a wrapper around one), called through ``forward`` with ``native_hw``.
        case: output of ``cases.prepare_case`` (``embeddings``, ``slice_index``, ``boxes``, ``valid``, ``shape``).
        temperature: optional ``(K,)`` temperatures dividing each region's logits.
        box_jitter: evaluation box jitter as a fraction of the box side; 0 uses the tight label boxes.
        generator: RNG for the jitter.
        pair_batch: pairs per decoder call, to bound memory.

    Returns:
        ``prob`` ``(K, H, W, D)`` float32, ``box_mask`` ``(K, H, W, D)`` bool with the (jittered) prompt boxes,
        ``pair_logits`` ``(P, H, W)`` before temperature, ``pair_slice`` ``(P,)`` volume slice index and
        ``pair_region`` ``(P,)``.
    """
    device = next(network.parameters()).device
    h, w, d = case["shape"]
    k = case["valid"].shape[1]
    slab_slice, pair_region = case["valid"].nonzero(as_tuple=True)
    boxes = case["boxes"][slab_slice, pair_region].float()
    always = torch.ones(len(boxes), dtype=torch.bool)
    if box_jitter > 0:
        boxes = jitter_boxes(boxes, always, (h, w), max_shift_fraction=box_jitter, generator=generator)

    logits = []
    for start in range(0, len(boxes), pair_batch):
        chosen = slice(start, start + pair_batch)
        embeddings = case["embeddings"][slab_slice[chosen]].to(device=device, dtype=torch.float32)
        logits.append(
            network(embeddings, pair_region[chosen].to(device), boxes=boxes[chosen].to(device), native_hw=(h, w))
            .squeeze(1)
            .float()
            .cpu()
        )
    pair_logits = torch.cat(logits) if logits else torch.zeros((0, h, w))

    scaled = pair_logits
    if temperature is not None and len(pair_logits):
        scaled = pair_logits / torch.as_tensor(temperature, dtype=torch.float32)[pair_region].view(-1, 1, 1)
    volume_slice = case["slice_index"][slab_slice]
    prob = torch.zeros((k, h, w, d), dtype=torch.float32)
    prob[pair_region, :, :, volume_slice] = torch.sigmoid(scaled)
    box_mask = torch.zeros((k, h, w, d), dtype=torch.bool)
    box_mask[pair_region, :, :, volume_slice] = box_masks(boxes, always, (h, w))
    return {
        "prob": prob,
        "box_mask": box_mask,
        "pair_logits": pair_logits,
        "pair_slice": volume_slice,
        "pair_region": pair_region,
    }


class CalSAMEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` over prepared cases (``keep_volume=True``), one case per iteration.

    The output holds ``pred`` ``(1, K, H, W, D)`` probabilities, ``label`` ``(1, K, H, W, D)``, ``box_mask``,
    ``brain_mask`` ``(1, H, W, D)``, ``spacing``, ``case_id``, ``domain`` and the per-pair logits, so Ignite
    metrics and the report handler read everything from ``engine.state.output``. Batches come from a loader
    with ``slabs.first_item`` as collate function; run it with ``decollate=False``.

    Args:
        temperature: ``(K,)`` temperatures applied to logits, or ``None``.
        box_jitter: evaluation prompt jitter (fraction of the box side), 0 by default.
        jitter_seed: seed of the evaluation jitter RNG.
        args, kwargs: passed to ``SupervisedEvaluator``.
    """

    def __init__(
        self,
        *args,
        temperature: torch.Tensor | list[float] | None = None,
        box_jitter: float = 0.0,
        jitter_seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.temperature = None if temperature is None else torch.as_tensor(temperature, dtype=torch.float32)
        self.box_jitter = float(box_jitter)
        self.jitter_seed = int(jitter_seed)

    def _iteration(self, engine: CalSAMEvaluator, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        case = batchdata
        engine.network.eval()
        # One generator per case keeps jittered evaluation reproducible whatever the case order.
        generator = torch.Generator().manual_seed(engine.jitter_seed + engine.state.iteration)
        result = predict_volume(
            engine.network, case, temperature=engine.temperature, box_jitter=engine.box_jitter, generator=generator
        )
        engine.state.output = {
            Keys.PRED: result["prob"].unsqueeze(0),
            Keys.LABEL: case["volume_regions"].unsqueeze(0).float(),
            "box_mask": result["box_mask"].unsqueeze(0),
            "brain_mask": case["brain"].unsqueeze(0),
            "spacing": case["spacing"],
            "case_id": case["case_id"],
            "domain": case["domain"],
            "pair_logits": result["pair_logits"],
            "pair_region": result["pair_region"],
            "pair_slice": result["pair_slice"],
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
