"""CalSAM network: a SAM whose image and prompt encoders are frozen and whose mask decoder is trained.

Region conditioning: a BraTS slice has three nested regions (TC, WT, ET) whose boxes often coincide (the
enhancing rim and the tumour core share one box), so a box alone cannot tell the decoder which region to draw.
Each region therefore reads its own mask token: with ``K`` <= 3 regions, region ``k`` uses SAM's multimask token
``k + 1``; with ``K = 1`` it uses the single-mask token 0, as stock SAM does for one unambiguous prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .prompts import box_masks
from .sam_builder import build_sam, resolve_spec, spec_as_dict
from .sam_checkpoint import load_sam_checkpoint, module_sha256
from .sam_input import boxes_to_encoder_frame, lowres_to_native, points_to_encoder_frame, slices_to_encoder_input

logger = logging.getLogger(__name__)


class CalSAMNet(nn.Module):
    """SAM with frozen encoders and a batched, region-conditioned mask decoder.

    Args:
        variant: SAM size, one of ``vit_b``, ``vit_l``, ``vit_h``, ``small``.
        image_size: encoder input side in pixels; ``None`` keeps the variant default (1024, or 256 for small).
        checkpoint: path to an official SAM or MedSAM checkpoint, or ``None`` for random weights.
        num_regions: number of sigmoid region channels ``K`` (3 for BraTS TC/WT/ET, 1 for a lesion).
        init_seed: seed of the random initial weights, recorded so a random-encoder model can be rebuilt.
        box_mask_prompt: also give each box as SAM's dense mask prompt (the filled box, +1 inside and -1
            outside, in the decoder frame). A decoder trained from scratch learns the box location from this
            spatial input far faster than from the two corner tokens; pretrained SAM decoders do not need it.
        box_logit_prior: added to the mask logits inside each box and subtracted outside it (0 turns it off),
            so an untrained decoder predicts the filled box and training learns corrections to it. For
            decoders trained from random weights in a few epochs (the quickstart); 0 for pretrained SAM.
    """

    def __init__(
        self,
        variant: str = "vit_b",
        image_size: int | None = None,
        checkpoint: str | None = None,
        num_regions: int = 3,
        init_seed: int = 0,
        box_mask_prompt: bool = False,
        box_logit_prior: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= int(num_regions) <= 3:
            raise ValueError(
                f"num_regions must be 1, 2 or 3 (one SAM mask token per region), got {num_regions}. "
                "Use 3 for BraTS TC/WT/ET and 1 for a single lesion channel."
            )
        self.sam = build_sam(variant, image_size, init_seed=init_seed)
        if checkpoint:
            load_sam_checkpoint(self.sam, checkpoint)
        self.spec = resolve_spec(variant, image_size)
        self.num_regions = int(num_regions)
        self.box_mask_prompt = bool(box_mask_prompt)
        self.box_logit_prior = float(box_logit_prior)
        self.settings = {
            **spec_as_dict(variant, image_size),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "num_regions": self.num_regions,
            "init_seed": int(init_seed),
            "box_mask_prompt": self.box_mask_prompt,
            "box_logit_prior": self.box_logit_prior,
        }
        for module in (self.sam.image_encoder, self.sam.prompt_encoder):
            module.requires_grad_(False)
            module.eval()
        self._encoder_sha256: str | None = None

    def set_prompt_options(self, box_mask_prompt: bool, box_logit_prior: float) -> None:
        """Switch the box prompt options, which change no weight, to those a checkpoint was trained with."""
        self.box_mask_prompt = bool(box_mask_prompt)
        self.box_logit_prior = float(box_logit_prior)
        self.settings.update(box_mask_prompt=self.box_mask_prompt, box_logit_prior=self.box_logit_prior)

    @property
    def image_size(self) -> int:
        """Side of the square encoder input in pixels."""
        return self.spec.image_size

    @property
    def encoder_sha256(self) -> str:
        """Hash of the frozen image and prompt encoder weights, computed once."""
        if self._encoder_sha256 is None:
            self._encoder_sha256 = module_sha256(nn.ModuleList([self.sam.image_encoder, self.sam.prompt_encoder]))
        return self._encoder_sha256

    def train(self, mode: bool = True) -> CalSAMNet:
        """Switch the decoder to ``mode``; the frozen encoders stay in eval mode."""
        super().train(mode)
        self.sam.image_encoder.eval()
        self.sam.prompt_encoder.eval()
        return self

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Load a plain state dict, or the decoder weights of a CalSAM ``model.pt``.

        MONAI Label's bundle training task loads ``models/model.pt`` into the network through this method
        (with ``strict=False``) before it fine-tunes. That file holds only the decoder, so it goes through
        ``DecoderCheckpoint``, which checks the encoder hash and raises on any missing decoder weight.
        """
        # Imported here because decoder_checkpoint imports this module.
        from .decoder_checkpoint import FORMAT, DecoderCheckpoint

        if not (isinstance(state_dict, Mapping) and state_dict.get("format") == FORMAT):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        DecoderCheckpoint(self).load_state_dict(dict(state_dict))
        return _IncompatibleKeys([], [])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer may update: the mask decoder's, and only those."""
        return list(self.sam.mask_decoder.parameters())

    @torch.no_grad()
    def encode(self, slices: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Embed ``(B, 3, H, W)`` slices on the [0, 255] scale into ``(B, 256, h, w)`` with the frozen encoder."""
        device = next(self.sam.image_encoder.parameters()).device
        outputs = []
        for start in range(0, slices.shape[0], batch_size):
            chunk = slices_to_encoder_input(slices[start : start + batch_size].to(device), self.image_size)
            outputs.append(self.sam.image_encoder(chunk))
        return torch.cat(outputs, dim=0)

    def region_tokens(self, regions: torch.Tensor) -> torch.Tensor:
        """Mask-token index read for each region index in ``regions`` (see the module docstring)."""
        return regions + 1 if self.num_regions > 1 else torch.zeros_like(regions)

    def _box_mask_prompt(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Rasterise encoder-frame boxes to ``(P, 1, height, width)`` dense prompts: +1 inside, -1 outside."""
        scale = height / self.image_size
        inside = box_masks(
            boxes * scale, torch.ones(len(boxes), dtype=torch.bool, device=boxes.device), (height, width)
        )
        return inside.unsqueeze(1).to(boxes.dtype) * 2.0 - 1.0

    def decode(
        self,
        embeddings: torch.Tensor,
        regions: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode ``P`` (slice, region) pairs in one call, each pair with its own embedding and prompt.

        The stock ``MaskDecoder.predict_masks`` repeats each image embedding once per prompt, which only works
        for one image per call; here pair ``i`` attends to ``embeddings[i]`` alone.

        Args:
            embeddings: ``(P, 256, h, w)`` frozen image embeddings, one per pair.
            regions: ``(P,)`` long region index of each pair.
            boxes: ``(P, 4)`` boxes in the encoder input frame, or ``None``.
            points: ``(P, N, 2)`` points in the encoder input frame, or ``None``.
            point_labels: ``(P, N)`` 1 for foreground and 0 for background clicks.

        Returns:
            ``(P, 1, T/4, T/4)`` mask logits in the decoder frame.
        """
        p, c, h, w = embeddings.shape
        if p == 0:
            return embeddings.new_zeros((0, 1, 4 * h, 4 * w))
        prompt_encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        if boxes is None and points is None:
            sparse = embeddings.new_zeros((p, 0, c))
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(p, c, h, w)
        else:
            point_pair = None if points is None else (points, point_labels)
            masks = self._box_mask_prompt(boxes, 4 * h, 4 * w) if self.box_mask_prompt and boxes is not None else None
            sparse, dense = prompt_encoder(points=point_pair, boxes=boxes, masks=masks)

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(p, -1, -1), sparse], dim=1)
        positional = prompt_encoder.get_dense_pe().expand(p, -1, -1, -1)
        hidden, image_tokens = decoder.transformer(embeddings + dense, positional, tokens)

        upscaled = decoder.output_upscaling(image_tokens.transpose(1, 2).reshape(p, c, h, w))
        token_index = self.region_tokens(regions.to(embeddings.device))
        # Each pair needs one mask token; run every hypernetwork on its pairs only.
        weights = upscaled.new_zeros((p, upscaled.shape[1]))
        for index, hypernetwork in enumerate(decoder.output_hypernetworks_mlps):
            chosen = token_index == index
            if bool(chosen.any()):
                weights[chosen] = hypernetwork(hidden[chosen, 1 + index, :])
        masks = torch.einsum("pc,pchw->phw", weights, upscaled).unsqueeze(1)
        if self.box_logit_prior and boxes is not None:
            # Start from "the box is the mask": the decoder then learns corrections to the filled box.
            masks = masks + self.box_logit_prior * self._box_mask_prompt(boxes, 4 * h, 4 * w)
        return masks

    def decode_native(
        self,
        embeddings: torch.Tensor,
        regions: torch.Tensor,
        native_hw: tuple[int, int],
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode pairs from native-frame prompts and return ``(P, 1, H, W)`` logits on the native slice grid."""
        if boxes is not None:
            boxes = boxes_to_encoder_frame(boxes, native_hw, self.image_size)
        if points is not None:
            points = points_to_encoder_frame(points, native_hw, self.image_size)
        lowres = self.decode(embeddings, regions, boxes=boxes, points=points, point_labels=point_labels)
        return lowres_to_native(lowres, native_hw, self.image_size)

    def forward(
        self,
        embeddings: torch.Tensor,
        regions: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        native_hw: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Decode pairs; with ``native_hw`` the prompts and the returned logits are in the native slice frame.

        Training calls the network through ``forward`` so that a DistributedDataParallel wrapper sees the call
        and synchronises the decoder gradients.
        """
        if native_hw is None:
            return self.decode(embeddings, regions, boxes=boxes, points=points, point_labels=point_labels)
        return self.decode_native(embeddings, regions, native_hw, boxes=boxes, points=points, point_labels=point_labels)
