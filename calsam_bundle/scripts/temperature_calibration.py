"""Post-hoc temperature scaling: fit one temperature per region on source validation cases after training.

The fit uses the best checkpoint (``model.pt``), the prompted slices of the validation cases and, inside them,
the voxels of each prompt box grown by ``box_margin`` pixels: the same neighbourhood that the headline ECE is
computed on. The temperatures are written into ``model.pt``; evaluation applies them when asked to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from .atomic_files import temporary_sibling
from .decoder_checkpoint import DecoderCheckpoint, read_checkpoint
from .evaluator import predict_volume
from .prompts import box_masks
from .temperature import fit_temperature

logger = logging.getLogger(__name__)


def collect_validation_logits(network, cases: list[dict], box_margin: int) -> tuple[torch.Tensor, ...]:
    """Return ``(K, N)`` logits, labels and a fit mask gathered from the prompted pairs of ``cases``.

    Regions with fewer voxels are padded with masked-out zeros, so every row has the same length ``N``.
    """
    per_region: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for case in cases:
        result = predict_volume(network, case)
        h, w, _ = case["shape"]
        always = torch.ones(len(result["pair_region"]), dtype=torch.bool)
        slab_slice, pair_region = case["valid"].nonzero(as_tuple=True)
        boxes = case["boxes"][slab_slice, pair_region].float()
        inside = box_masks(boxes, always, (h, w), margin=box_margin)
        for pair, region in enumerate(result["pair_region"].tolist()):
            labels = case["volume_regions"][region, :, :, result["pair_slice"][pair]]
            chosen = inside[pair]
            per_region.setdefault(region, []).append((result["pair_logits"][pair][chosen], labels[chosen]))

    num_regions = case["valid"].shape[1] if cases else 0
    rows = [
        (
            torch.cat([z for z, _ in per_region.get(k, [])] or [torch.zeros(0)]),
            torch.cat([y for _, y in per_region.get(k, [])] or [torch.zeros(0, dtype=torch.bool)]),
        )
        for k in range(num_regions)
    ]
    length = max((len(z) for z, _ in rows), default=0)
    logits = torch.zeros((num_regions, length))
    labels = torch.zeros((num_regions, length), dtype=torch.bool)
    mask = torch.zeros((num_regions, length), dtype=torch.bool)
    for k, (z, y) in enumerate(rows):
        logits[k, : len(z)] = z
        labels[k, : len(y)] = y.bool()
        mask[k, : len(z)] = True
    return logits, labels, mask


class TemperatureCalibrationHandler:
    """At the end of training, fit temperatures on ``cases`` with the best ``model.pt`` and store them in it.

    Args:
        cases: prepared validation cases (``keep_volume=True``).
        model_path: the best-decoder checkpoint written during validation.
        box_margin: in-plane growth of the prompt boxes that bounds the fitted voxels, in pixels.
        enabled: switch the fit off without removing the handler.
    """

    def __init__(self, cases: list[dict], model_path: str, box_margin: int = 5, enabled: bool = True) -> None:
        self.cases = cases
        self.model_path = Path(model_path)
        self.box_margin = int(box_margin)
        self.enabled = bool(enabled)
        self.temperature: list[float] | None = None

    def attach(self, engine: Engine) -> None:
        """Fit when the trainer completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if not self.model_path.is_file():
            logger.warning("No %s to calibrate: no validation epoch saved a model.", self.model_path)
            return
        state = read_checkpoint(self.model_path)
        holder = DecoderCheckpoint(engine.network)
        # The live network gets the best weights: it is not trained further after COMPLETED.
        holder.load_state_dict(state)
        logits, labels, mask = collect_validation_logits(holder.core, self.cases, self.box_margin)
        try:
            temperature = fit_temperature(logits, labels, mask)
        except ValueError as error:
            logger.warning("Temperature fit skipped: %s", error)
            return
        self.temperature = [float(t) for t in temperature]
        state["temperature"] = self.temperature
        self._save(state)
        logger.info(
            "Fitted temperatures %s on %d validation cases; stored in %s.",
            [round(t, 3) for t in self.temperature],
            len(self.cases),
            self.model_path,
        )

    def _save(self, state: dict) -> None:
        handle, temporary = temporary_sibling(self.model_path)
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, self.model_path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
