"""Whole-volume CalSAM network: the bundle's ``network_def`` for inference and MONAI Label.

MONAI Label's bundle task calls ``network(image[None])`` with nothing but the preprocessed tensor. The prompts
therefore travel as three extra channels after the image channels, the way DeepEdit carries its guidance: a
foreground-click map, a background-click map and an ROI mask. ``monailabel_prompts.AddPromptChannelsd`` builds
them from a request. A voxel of a prompt channel is set when its value is at least 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .decoder_checkpoint import FORMAT, DecoderCheckpoint, load_network, read_checkpoint
from .network import CalSAMNet
from .prompt_files import SlicePrompt, automatic_prompts, check_prompts, prompts_from_clicks
from .regions import get_convention
from .volume_prediction import predict_prompted_volume, volume_to_sam_slices

logger = logging.getLogger(__name__)

PROMPT_CHANNELS = ("foreground", "background", "roi")
_REBUILD_KEYS = ("variant", "image_size", "num_regions", "init_seed")


def recorded_preprocessing(model_path: str | Path) -> dict:
    """Preprocessing settings stored in ``model.pt``, or an empty dict when the file does not exist."""
    if not Path(model_path).is_file():
        return {}
    return dict(read_checkpoint(model_path).get("preprocessing") or {})


def recorded_label_convention(model_path: str | Path, default: str = "brats2021") -> str:
    """Label convention stored in ``model.pt``, ``default`` when the file or the entry is missing."""
    return recorded_preprocessing(model_path).get("label_convention") or default


def resolve_sam_checkpoint(model_path: str | Path, models_dir: str | Path) -> str | None:
    """Find the SAM checkpoint that ``model.pt`` was trained with, also after the bundle has moved.

    Returns ``None`` for a random-weight encoder, the recorded path when it exists, and otherwise the file of the
    same name in ``models_dir`` (a relative path recorded at training time breaks when the working folder
    changes). When neither exists the recorded path is returned, so loading fails with that path in the message.
    """
    if not Path(model_path).is_file():
        return None
    recorded = (read_checkpoint(model_path).get("network") or {}).get("checkpoint")
    if not recorded or Path(recorded).is_file():
        return recorded
    beside = Path(models_dir) / Path(recorded).name
    return str(beside) if beside.is_file() else recorded


class CalSAMVolumeNet(nn.Module):
    """Prompted CalSAM on native volumes: ``(B, C + 3, H, W, D)`` in, ``(B, K, H, W, D)`` probabilities out.

    With an existing ``model_path`` the SAM variant, input size, preprocessing and calibration temperature come
    from that file. Without one, the network is built from the keyword arguments with a random decoder, which is
    what ``verify_net_in_out`` needs to check shapes before any training.

    Args:
        model_path: the CalSAM decoder checkpoint (``models/model.pt``), or ``None``.
        sam_checkpoint: SAM checkpoint path to use instead of the one recorded in ``model_path``.
        variant: SAM variant when no model file exists.
        image_size: encoder input side when no model file exists.
        num_regions: ``K`` when no model file exists.
        init_seed: random-weight seed when no model file exists.
        label_convention: label convention when neither the model file nor its preprocessing names one.
        image_channels: image channels shown to SAM when the model file records none.
        percentiles: intensity clipping percentiles when the model file records none.
        apply_temperature: divide logits by the stored temperature when the model file has one.
        restrict_to_roi: in ``forward``, set every voxel outside a request's ROI to background.
    """

    def __init__(
        self,
        model_path: str | None = None,
        sam_checkpoint: str | None = None,
        variant: str = "vit_b",
        image_size: int | None = None,
        num_regions: int = 3,
        init_seed: int = 0,
        label_convention: str = "brats2021",
        image_channels: Sequence[int] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        apply_temperature: bool = True,
        restrict_to_roi: bool = True,
    ) -> None:
        super().__init__()
        self.sam_checkpoint = sam_checkpoint
        self.apply_temperature = bool(apply_temperature)
        self.restrict_to_roi = bool(restrict_to_roi)
        self.model_path = str(model_path) if model_path else None
        self.defaults = {"label_convention": label_convention, "image_channels": image_channels}
        self.defaults["percentiles"] = list(percentiles)
        if self.model_path and Path(self.model_path).is_file():
            self.network, holder = load_network(self.model_path, sam_checkpoint=sam_checkpoint)
            self._take_settings(holder.preprocessing, holder.temperature)
        else:
            if self.model_path:
                logger.warning("Model file %s not found; the decoder weights are random.", self.model_path)
            self.network = CalSAMNet(variant, image_size, sam_checkpoint, num_regions, init_seed).eval()
            self._take_settings({}, None)

    def _take_settings(self, preprocessing: dict, temperature) -> None:
        merged = {**self.defaults, **{k: v for k, v in preprocessing.items() if v is not None}}
        self.preprocessing = merged
        self.convention = get_convention(merged["label_convention"])
        self.temperature = None if temperature is None else [float(t) for t in temperature]
        if len(self.convention.regions) != self.num_regions:
            raise ValueError(
                f"The network has {self.num_regions} region channels but label convention "
                f"{self.convention.name!r} has {len(self.convention.regions)}; set label_convention to match."
            )

    @property
    def num_regions(self) -> int:
        """Number of region channels ``K``."""
        return self.network.num_regions

    @property
    def region_names(self) -> tuple[str, ...]:
        """Region channel names of the label convention, in channel order."""
        return self.convention.region_names

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Load a CalSAM decoder checkpoint (rebuilding the SAM it names if needed) or a plain state dict.

        MONAI Label loads ``models/model.pt`` through this method. A CalSAM checkpoint brings its own network
        settings, preprocessing and temperature, and its encoder hash must match the rebuilt encoder.
        """
        if not (isinstance(state_dict, Mapping) and state_dict.get("format") == FORMAT):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        recorded = state_dict.get("network") or {}
        current = self.network.settings
        if any(key in recorded and recorded[key] != current.get(key) for key in _REBUILD_KEYS):
            device = next(self.network.parameters()).device
            logger.info("Rebuilding the network with the checkpoint's settings %s.", recorded)
            self.network = CalSAMNet(
                recorded.get("variant", "vit_b"),
                recorded.get("image_size"),
                self.sam_checkpoint or recorded.get("checkpoint"),
                recorded.get("num_regions", 3),
                recorded.get("init_seed", 0),
            ).to(device)
        # A decoder trained with the box as a dense prompt or a logit prior needs the same at inference.
        self.network.set_prompt_options(recorded.get("box_mask_prompt", False), recorded.get("box_logit_prior", 0.0))
        holder = DecoderCheckpoint(self.network)
        holder.load_state_dict(dict(state_dict))
        self._take_settings(holder.preprocessing, holder.temperature)
        self.network.eval()
        return _IncompatibleKeys([], [])

    def predict(self, image: torch.Tensor, prompts: Sequence[SlicePrompt], brain: torch.Tensor | None = None) -> dict:
        """Predict ``(K, H, W, D)`` probabilities of one ``(C, H, W, D)`` volume from its prompts.

        The brain mask (default: voxels where any channel is non-zero) sets the intensity percentiles, as in
        training. Returns ``prob`` and ``decoded`` from ``volume_prediction.predict_prompted_volume``.
        """
        # MetaTensor dispatch slows every operation of the encoder and decoder several-fold; plain tensors suffice.
        image = _plain_tensor(image)
        brain = (image != 0).any(dim=0) if brain is None else _plain_tensor(brain).bool()
        check_prompts(prompts, tuple(image.shape[1:]), self.num_regions, "prompts")
        sam_slices = volume_to_sam_slices(
            image, brain, self.preprocessing.get("image_channels"), self.preprocessing.get("percentiles")
        )
        temperature = self.temperature if self.apply_temperature else None
        return predict_prompted_volume(self.network, sam_slices, prompts, self.num_regions, temperature=temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C + 3, H, W, D)`` image-plus-prompt channels to ``(B, K, H, W, D)`` float32 probabilities.

        With an ROI and ``restrict_to_roi``, only slices inside the ROI are decoded and every voxel outside the
        ROI's bounding cuboid gets probability 0, because MONAI Label clients send the ROI as the region to
        segment. Clicks on slices outside the ROI are then ignored with a warning. A volume whose prompt channels
        are all empty is predicted in automatic mode: every region on every slice with a brain voxel, unprompted.
        """
        b, channels, h, w, d = x.shape
        if channels <= len(PROMPT_CHANNELS):
            raise ValueError(
                f"Expected image channels followed by {len(PROMPT_CHANNELS)} prompt channels "
                f"{PROMPT_CHANNELS}, got {channels} channels; add them with monailabel_prompts.AddPromptChannelsd."
            )
        outputs = []
        for volume in _plain_tensor(x).detach().float().cpu():
            image, guidance = volume[: -len(PROMPT_CHANNELS)], volume[-len(PROMPT_CHANNELS) :] >= 0.5
            roi = roi_from_mask(guidance[2])
            prompts = prompts_from_clicks(
                guidance[0].nonzero().tolist(), guidance[1].nonzero().tolist(), roi, self.num_regions
            )
            if roi is not None and self.restrict_to_roi:
                inside = [prompt for prompt in prompts if roi[4] <= prompt.slice_index < roi[5]]
                if len(inside) < len(prompts):
                    logger.warning("Ignoring clicks on slices outside the ROI slices %d..%d.", roi[4], roi[5] - 1)
                prompts = inside
            if not prompts:
                prompts = automatic_prompts((image != 0).any(dim=0), self.num_regions)
            prob = self.predict(image, prompts)["prob"]
            if roi is not None and self.restrict_to_roi:
                prob = prob * roi_cuboid(roi, (h, w, d))
            outputs.append(prob)
        return torch.stack(outputs).to(x.device)


def _plain_tensor(tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def roi_from_mask(roi_mask: torch.Tensor) -> list[int] | None:
    """Bounding cuboid ``[i0, j0, i1, j1, k0, k1]`` (exclusive ends) of a ``(H, W, D)`` bool mask, or ``None``."""
    if not bool(roi_mask.any()):
        return None
    index = roi_mask.nonzero()
    low, high = index.amin(dim=0), index.amax(dim=0) + 1
    return [int(low[0]), int(low[1]), int(high[0]), int(high[1]), int(low[2]), int(high[2])]


def roi_cuboid(roi: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """``(H, W, D)`` float mask, 1 inside the ``[i0, j0, i1, j1, k0, k1]`` cuboid."""
    i0, j0, i1, j1, k0, k1 = roi
    mask = torch.zeros(shape, dtype=torch.float32)
    mask[i0:i1, j0:j1, k0:k1] = 1.0
    return mask


def prompts_from_channels(guidance: torch.Tensor, num_regions: int) -> list[SlicePrompt]:
    """Read clicks and the ROI's bounding box from ``(3, H, W, D)`` bool foreground, background and ROI maps."""
    roi = roi_from_mask(guidance[2])
    return prompts_from_clicks(guidance[0].nonzero().tolist(), guidance[1].nonzero().tolist(), roi, num_regions)
