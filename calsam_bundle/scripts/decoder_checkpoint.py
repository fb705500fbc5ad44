"""The bundle's ``models/model.pt``: trained decoder weights plus what is needed to rebuild the network.

The frozen encoders are not stored (375 MB for ViT-B); the file records the SAM variant, input size, source
checkpoint and a SHA-256 of the encoder weights instead, and loading verifies that the rebuilt encoder matches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .network import CalSAMNet

logger = logging.getLogger(__name__)

FORMAT = "calsam-decoder-v1"


def _strip_wrapper_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that DataParallel and DistributedDataParallel add to every key."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return state


class DecoderCheckpoint:
    """``state_dict``/``load_state_dict`` view of a ``CalSAMNet`` for Ignite and MONAI checkpoint handlers.

    Args:
        network: the network, optionally wrapped by DistributedDataParallel.
        preprocessing: settings needed to prepare new data the same way (label convention, channels, ...).
        temperature: optional ``(K,)`` calibration temperatures to store with the weights.
    """

    def __init__(self, network: torch.nn.Module, preprocessing: dict | None = None, temperature=None) -> None:
        self.network = network
        self.preprocessing = dict(preprocessing or {})
        self.temperature = None if temperature is None else [float(t) for t in temperature]

    @property
    def core(self) -> CalSAMNet:
        """The bare ``CalSAMNet``."""
        return self.network.module if hasattr(self.network, "module") else self.network

    def state_dict(self) -> dict:
        """Decoder weights with the network settings, preprocessing, encoder hash and temperature."""
        core = self.core
        return {
            "format": FORMAT,
            "mask_decoder": {k: v.detach().cpu() for k, v in core.sam.mask_decoder.state_dict().items()},
            "network": dict(core.settings),
            "encoder_sha256": core.encoder_sha256,
            "preprocessing": self.preprocessing,
            "temperature": self.temperature,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load decoder weights; the encoder hash must match the network's frozen encoder."""
        if state.get("format") != FORMAT:
            raise ValueError(
                f"Not a CalSAM decoder checkpoint (format {state.get('format')!r}, expected {FORMAT!r}); "
                "official SAM checkpoints go to the network's 'checkpoint' argument instead."
            )
        core = self.core
        if state["encoder_sha256"] != core.encoder_sha256:
            raise ValueError(
                "The checkpoint's decoder was trained on another frozen encoder "
                f"(encoder SHA-256 {state['encoder_sha256'][:12]}..., this network {core.encoder_sha256[:12]}...). "
                f"Build the network with the SAM checkpoint {state['network'].get('checkpoint')!r} and variant "
                f"{state['network'].get('variant')!r} it was trained with."
            )
        decoder_state = _strip_wrapper_prefix(state["mask_decoder"])
        expected = core.sam.mask_decoder.state_dict()
        matched = set(decoder_state) & set(expected)
        if not matched:
            raise ValueError(
                f"No decoder key of the checkpoint matches the network (checkpoint keys start with "
                f"{sorted(decoder_state)[:3]}); the file is not a CalSAM decoder checkpoint."
            )
        result = core.sam.mask_decoder.load_state_dict(decoder_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"Decoder checkpoint mismatch: missing {result.missing_keys[:8]}, unexpected "
                f"{result.unexpected_keys[:8]}."
            )
        self.preprocessing = dict(state.get("preprocessing") or {})
        self.temperature = state.get("temperature")


def read_checkpoint(path: str | Path) -> dict:
    """Read ``model.pt`` as a plain dict, unwrapping the ``{"model": ...}`` layout of multi-object saves."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model checkpoint {str(path)!r} not found; train first or pass its path.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format" not in state and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def load_network(path: str | Path, sam_checkpoint: str | None = None, device: str | torch.device = "cpu"):
    """Rebuild the network of ``model.pt`` and load its decoder.

    Args:
        path: the CalSAM decoder checkpoint.
        sam_checkpoint: SAM checkpoint to use instead of the recorded path (for example after moving files).
        device: where to place the network.

    Returns:
        ``(network, checkpoint)``: the ``CalSAMNet`` in eval mode and the ``DecoderCheckpoint`` holding the
        stored preprocessing settings and temperature.
    """
    state = read_checkpoint(path)
    settings = state.get("network") or {}
    network = CalSAMNet(
        variant=settings.get("variant", "vit_b"),
        image_size=settings.get("image_size"),
        checkpoint=sam_checkpoint or settings.get("checkpoint"),
        num_regions=settings.get("num_regions", 3),
        init_seed=settings.get("init_seed", 0),
        box_mask_prompt=settings.get("box_mask_prompt", False),
        box_logit_prior=settings.get("box_logit_prior", 0.0),
    )
    holder = DecoderCheckpoint(network)
    holder.load_state_dict(state)
    logger.info("Loaded CalSAM decoder from %s (variant %s).", path, settings.get("variant"))
    return network.to(device).eval(), holder
