"""Load official SAM and MedSAM checkpoints into a SAM built by ``sam_builder``.

Accepted layouts: a plain ``Sam`` state dict (official ``sam_vit_*.pth``, MedSAM's ``medsam_vit_b.pth``), the same
nested under ``"model"`` or ``"state_dict"`` (training checkpoints), and keys prefixed by ``module.`` (saved from
a DistributedDataParallel wrapper). An encoder built for a smaller input than the checkpoint's 1024 px gets its
absolute position embedding and its global-attention relative position tables interpolated.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)

# Checkpoints whose MD5 is known. They come from third-party mirrors, so a mismatch is reported to the user.
KNOWN_CHECKPOINT_MD5 = {
    "sam_vit_b_01ec64.pth": "01ec64d29a2fca3f0661936605ae66f8",
    "sam_vit_l_0b3195.pth": "0b3195507c641ddb6910d2bb5adee89c",
    "sam_vit_h_4b8939.pth": "4b8939a88964f0f4ff5f5b2642c598a6",
}
_NESTING_KEYS = ("model", "state_dict")
_MAX_LISTED_KEYS = 8


def file_md5(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Return the hex MD5 of a file, read in chunks so a 2.5 GB checkpoint does not load into memory."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM state dict from ``path`` in any accepted layout, as tensors on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no tensor state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {str(path)!r} not found. Download it (see docs/README.md, 'Pretrained weights') or "
            "set checkpoint to null to start from random weights."
        )
    # weights_only refuses pickled code, so a checkpoint from an untrusted mirror cannot run anything on load.
    content = torch.load(path, map_location="cpu", weights_only=True)
    for key in _NESTING_KEYS:
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not any(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{str(path)!r} holds no state dict of tensors (top-level type {type(content).__name__}).")
    if all(key.startswith("module.") for key in content):
        content = {key[len("module.") :]: value for key, value in content.items()}
    return content


def _resize_position_tables(state: dict[str, torch.Tensor], sam: Sam) -> dict[str, torch.Tensor]:
    """Interpolate position tables of a checkpoint made for another encoder input size."""
    target = sam.state_dict()
    resized = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        wanted = target[key].shape
        if key == "image_encoder.pos_embed":
            # (1, H, W, C) token grid: resize the grid, keep the channels.
            grid = value.permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=wanted[1:3], mode="bicubic", align_corners=False)
            resized[key] = grid.permute(0, 2, 3, 1).contiguous()
        elif key.endswith(".rel_pos_h") or key.endswith(".rel_pos_w"):
            # (2 * size - 1, head_dim) table of a global-attention block: resize along the offset axis.
            table = value.t().unsqueeze(0)
            table = F.interpolate(table, size=wanted[0], mode="linear", align_corners=False)
            resized[key] = table.squeeze(0).t().contiguous()
    return resized


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown}{f' and {more} more' if more > 0 else ''}"


def load_sam_checkpoint(sam: Sam, path: str | Path) -> Sam:
    """Load a full SAM checkpoint into ``sam`` in place; every key must match.

    Args:
        sam: the model to fill, built with the checkpoint's architecture.
        path: checkpoint file.

    Returns:
        ``sam``, for chaining.

    Raises:
        ValueError: keys are missing or unexpected, or shapes differ in a way that interpolation cannot fix;
            the message lists the keys so the user can tell a wrong variant from a corrupt file.
    """
    path = Path(path)
    expected_md5 = KNOWN_CHECKPOINT_MD5.get(path.name)
    if expected_md5 is not None:
        actual_md5 = file_md5(path)
        if actual_md5 != expected_md5:
            raise ValueError(
                f"{str(path)!r} has MD5 {actual_md5}, expected {expected_md5} for the official file; the download "
                "is incomplete or altered. Download it again."
            )

    state = _resize_position_tables(read_state_dict(path), sam)
    target = sam.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(
        f"{key} {tuple(state[key].shape)} vs model {tuple(target[key].shape)}"
        for key in set(state) & set(target)
        if state[key].shape != target[key].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_listed(mismatched)})")
        raise ValueError(
            f"Checkpoint {str(path)!r} does not match the SAM architecture: {'; '.join(problems)}. "
            "Check that the variant (vit_b, vit_l, vit_h) matches the checkpoint file."
        )
    sam.load_state_dict(state, strict=True)
    logger.info("Loaded SAM checkpoint %s (%d tensors).", path, len(state))
    return sam


def module_sha256(module: torch.nn.Module) -> str:
    """Return a SHA-256 over the module's state dict names, shapes, dtypes and bytes.

    Two modules with equal weights give equal hashes, so the hash identifies frozen-encoder weights in
    checkpoints and embedding cache keys.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
