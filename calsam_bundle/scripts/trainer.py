"""Supervised trainer for CalSAM's mask decoder on slabs of frozen slice embeddings.

Each iteration samples one box prompt per (slice, region) pair that contains the region, decodes all pairs of
the slab in one call, and computes the segmentation loss. The iteration then fires MONAI's iteration events in
the usual order, so penalty handlers attached to ``LOSS_COMPLETED`` (FIP, CMP) add their terms to
``engine.state.output["loss"]`` before ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .prompts import box_masks, jitter_boxes


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside a DataParallel or DistributedDataParallel wrapper, or the network itself."""
    return network.module if hasattr(network, "module") else network


class CalSAMTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration samples prompts and decodes a slab of cached embeddings.

    Batches are slab dicts from ``slabs.SlabDataset`` collated with ``slabs.first_item``. The iteration writes
    the keys documented in ``penalty_handlers`` (``features``, ``logits``, ``decode``, ``target``, ``roi``,
    ``pair_slice``) next to MONAI's ``image``, ``label``, ``pred`` and ``loss``.

    Args:
        box_jitter: maximum box edge shift as a fraction of the box side during training.
        box_jitter_pixels: jitter floor in pixels, so small boxes move too.
        roi_margin: in-plane margin in pixels around each prompt box; penalties act inside this region.
        encoder_every_step: recompute embeddings from the stored slices every iteration instead of using the
            cache; needed only when ``image_augmentation`` changes the pixels.
        image_augmentation: optional callable on ``(S, 3, H, W)`` slices on the [0, 255] scale.
        prompt_seed: seed of the prompt jitter RNG.
        args, kwargs: passed to ``SupervisedTrainer`` (``device``, ``max_epochs``, ``train_data_loader``,
            ``network``, ``optimizer``, ``loss_function``, ``train_handlers``, ...).
    """

    def __init__(
        self,
        *args,
        box_jitter: float = 0.1,
        box_jitter_pixels: float = 2.0,
        roi_margin: int = 5,
        encoder_every_step: bool = False,
        image_augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prompt_seed: int = 0,
        **kwargs,
    ) -> None:
        # The output holds a decode closure and per-pair tensors, not a batch that MONAI could decollate.
        kwargs.setdefault("decollate", False)
        # Set before the base constructor attaches the handlers: the FIP handler switches it on in attach().
        self.features_require_grad = False
        super().__init__(*args, **kwargs)
        if image_augmentation is not None and not encoder_every_step:
            raise ValueError(
                "image_augmentation changes the pixels, so cached embeddings would be stale; "
                "set encoder_every_step: true to use it."
            )
        self.box_jitter = float(box_jitter)
        self.box_jitter_pixels = float(box_jitter_pixels)
        self.roi_margin = int(roi_margin)
        self.encoder_every_step = bool(encoder_every_step)
        self.image_augmentation = image_augmentation
        self.prompt_generator = torch.Generator().manual_seed(int(prompt_seed))

    def _slab_features(self, slab: dict) -> torch.Tensor:
        device = self.state.device
        if self.encoder_every_step:
            slices = slab["slices"].float()
            if self.image_augmentation is not None:
                slices = self.image_augmentation(slices)
            features = unwrap(self.network).encode(slices.to(device))
        else:
            features = slab["embeddings"].to(device=device, dtype=torch.float32)
        features = features.detach()
        if self.features_require_grad:
            features.requires_grad_(True)
        return features

    def _iteration(self, engine: CalSAMTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        slab = batchdata
        features = engine._slab_features(slab)
        native_hw = tuple(int(v) for v in slab["regions"].shape[-2:])

        pair_slice, pair_region = slab["valid"].nonzero(as_tuple=True)
        boxes = slab["boxes"][pair_slice, pair_region].float()
        always = torch.ones(len(boxes), dtype=torch.bool)
        if engine.box_jitter > 0 or engine.box_jitter_pixels > 0:
            boxes = jitter_boxes(
                boxes,
                always,
                native_hw,
                max_shift_fraction=engine.box_jitter,
                max_shift_pixels=engine.box_jitter_pixels,
                generator=engine.prompt_generator,
            )
        target = slab["regions"][pair_slice, pair_region].unsqueeze(1).float().to(device)
        roi = box_masks(boxes, always, native_hw, margin=engine.roi_margin).unsqueeze(1).float().to(device)
        boxes, pair_slice, pair_region = boxes.to(device), pair_slice.to(device), pair_region.to(device)
        network = engine.network

        def decode(slab_features: torch.Tensor, pair_index: torch.Tensor | None = None) -> torch.Tensor:
            chosen = slice(None) if pair_index is None else pair_index.to(device)
            return network(
                slab_features[pair_slice[chosen]], pair_region[chosen], boxes=boxes[chosen], native_hw=native_hw
            )

        engine.state.output = {
            Keys.IMAGE: features,
            Keys.LABEL: target,
            "features": features,
            "decode": decode,
            "target": target,
            "roi": roi,
            "pair_slice": pair_slice,
            "case_id": slab.get("case_id"),
        }
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        logits = decode(features)
        engine.state.output[Keys.PRED] = logits
        engine.state.output["logits"] = logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if len(logits):
            loss = engine.loss_function(logits, target).mean()
        else:
            # No prompted pair: a zero that still reaches the decoder, so backward and DDP stay in step.
            loss = sum(p.sum() for p in unwrap(network).trainable_parameters()) * 0.0
        engine.state.output[Keys.LOSS] = loss
        engine.state.output["seg_loss"] = loss.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.state.output[Keys.LOSS].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        # The closure and the graph-carrying tensors are not needed after the step; drop them to free memory.
        engine.state.output.pop("decode")
        engine.state.output["logits"] = logits.detach()
        engine.state.output[Keys.PRED] = engine.state.output["logits"]
        engine.state.output[Keys.LOSS] = engine.state.output[Keys.LOSS].detach()
        return engine.state.output
