"""Severity levels of the corruption suite: the TorchIO transform of each corruption and severity, and its seeding.

Each level is a TorchIO random transform with fixed parameter ranges. Ranges of successive levels do not overlap
where the transform allows it (motion, ghosting, spike, noise, blur), so a draw at a higher level is stronger than
any draw at a lower one. The bias field draws signed polynomial coefficients from ``[-c, c]``, so its strength
grows with ``c`` only on average.

One draw is applied to every channel: the image's modalities form one multi-channel ``tio.ScalarImage``. The
transform runs on the image divided channel-wise by its intensity scale and the result is multiplied back. The
scale of a channel is the 99.5th percentile of its brain voxels (the non-zero voxels of the clean image, the
convention of skull-stripped data). Noise std is therefore a fraction of that scale. Every other transform is
linear in the intensities (blur, motion and ghosting resample or edit k-space, a spike's amplitude is a fraction
of the spectrum's maximum) or multiplicative (bias field), so the scaling does not change it beyond rounding.

Seeding: the torch seed depends only on ``(seed, case id, corruption)``, through :func:`corruption_seed`, so a
draw does not depend on which other levels or cases are requested, nor on their order. The severity is left out
on purpose: the same uniform draws then map into each level's range, so the severities of one case show one
realisation at increasing strength.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torchio as tio

CORRUPTIONS: tuple[str, ...] = ("motion", "ghosting", "spike", "bias_field", "noise", "blur")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SCALE_PERCENTILE = 99.5
# TorchIO's Motion splits k-space into segments along the last array axis. The image is permuted so that the
# segments run along array axis 1 instead, an in-plane phase-encoding direction of axial slices, and the artefact
# shows in the axial slices that SAM receives.
MOTION_KSPACE_AXIS = 1

TRANSFORMS: dict[str, type[tio.Transform]] = {
    "motion": tio.RandomMotion,
    "ghosting": tio.RandomGhosting,
    "spike": tio.RandomSpike,
    "bias_field": tio.RandomBiasField,
    "noise": tio.RandomNoise,
    "blur": tio.RandomBlur,
}

# Keyword arguments of the TorchIO transform per corruption and severity. A pair (a, b) is a uniform range.
# Units: degrees and mm (motion), mm (blur std), fractions of the channel's intensity scale (noise std) or of the
# spectrum maximum (spike intensity), k-space attenuation from 0 to 1 (ghosting intensity).
LEVELS: dict[str, dict[int, dict]] = {
    "motion": {
        1: {"degrees": (0.25, 0.5), "translation": (0.25, 0.5), "num_transforms": 8},
        2: {"degrees": (0.5, 1.5), "translation": (0.5, 1.5), "num_transforms": 8},
        3: {"degrees": (1.5, 3.0), "translation": (1.5, 3.0), "num_transforms": 8},
        4: {"degrees": (3.0, 5.0), "translation": (3.0, 5.0), "num_transforms": 8},
        5: {"degrees": (5.0, 8.0), "translation": (5.0, 8.0), "num_transforms": 8},
    },
    # Ghosts along an in-plane axis (0 or 1), the phase-encoding directions of axial acquisitions.
    "ghosting": {
        1: {"num_ghosts": (2, 4), "axes": (0, 1), "intensity": (0.15, 0.30)},
        2: {"num_ghosts": (2, 4), "axes": (0, 1), "intensity": (0.30, 0.50)},
        3: {"num_ghosts": (2, 4), "axes": (0, 1), "intensity": (0.50, 0.70)},
        4: {"num_ghosts": (2, 4), "axes": (0, 1), "intensity": (0.70, 0.90)},
        5: {"num_ghosts": (2, 4), "axes": (0, 1), "intensity": (0.90, 1.00)},
    },
    "spike": {
        1: {"num_spikes": (1, 1), "intensity": (0.10, 0.20)},
        2: {"num_spikes": (1, 1), "intensity": (0.20, 0.35)},
        3: {"num_spikes": (1, 1), "intensity": (0.35, 0.50)},
        4: {"num_spikes": (1, 1), "intensity": (0.50, 0.75)},
        5: {"num_spikes": (1, 1), "intensity": (0.75, 1.00)},
    },
    "bias_field": {
        1: {"coefficients": 0.1, "order": 3},
        2: {"coefficients": 0.2, "order": 3},
        3: {"coefficients": 0.3, "order": 3},
        4: {"coefficients": 0.4, "order": 3},
        5: {"coefficients": 0.55, "order": 3},
    },
    "noise": {
        1: {"mean": 0.0, "std": (0.02, 0.03)},
        2: {"mean": 0.0, "std": (0.04, 0.06)},
        3: {"mean": 0.0, "std": (0.07, 0.09)},
        4: {"mean": 0.0, "std": (0.10, 0.13)},
        5: {"mean": 0.0, "std": (0.15, 0.20)},
    },
    "blur": {
        1: {"std": (0.5, 0.75)},
        2: {"std": (1.0, 1.25)},
        3: {"std": (1.5, 1.75)},
        4: {"std": (2.0, 2.5)},
        5: {"std": (3.0, 3.5)},
    },
}


def check_level(corruption: str, severity: int) -> None:
    """Raise a ValueError naming the valid choices if ``(corruption, severity)`` is not a level of the suite."""
    if corruption not in LEVELS:
        raise ValueError(f"Unknown corruption {corruption!r}; choose from {CORRUPTIONS}.")
    if isinstance(severity, bool) or severity not in LEVELS[corruption]:
        raise ValueError(f"Severity of {corruption!r} must be one of {SEVERITIES}, got {severity!r}.")


def level_parameters(corruption: str, severity: int) -> dict:
    """Return the TorchIO class name and keyword arguments of a level, as JSON-ready values."""
    check_level(corruption, severity)
    kwargs = {
        key: list(value) if isinstance(value, tuple) else value for key, value in LEVELS[corruption][severity].items()
    }
    return {"transform": TRANSFORMS[corruption].__name__, "kwargs": kwargs}


def make_transform(corruption: str, severity: int) -> tio.Transform:
    """Return the TorchIO random transform of a level."""
    check_level(corruption, severity)
    return TRANSFORMS[corruption](**LEVELS[corruption][severity])


def corruption_seed(seed: int, case_id: str, corruption: str) -> int:
    """Return the torch seed in ``[0, 2**31)`` of one case and corruption: SHA-256 of ``"seed/case_id/corruption"``."""
    text = f"{int(seed)}/{case_id}/{corruption}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 2**31


def intensity_scale(image: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Return the per-channel intensity scale ``(C,)`` of a ``(C, H, W, D)`` image over the ``(H, W, D)`` brain mask.

    A channel without a positive percentile (an empty brain or a constant zero channel) gets scale 1.
    """
    scales = []
    for channel in image:
        values = channel[brain].numpy()
        scale = float(np.percentile(values, SCALE_PERCENTILE)) if values.size else 0.0
        scales.append(scale if scale > 0 else 1.0)
    return torch.tensor(scales, dtype=torch.float32)


def apply_level(
    image: torch.Tensor, affine: np.ndarray, brain: torch.Tensor, corruption: str, severity: int, seed: int
) -> torch.Tensor:
    """Corrupt a ``(C, H, W, D)`` image at one level with the torch seed ``seed``; return float32 ``(C, H, W, D)``.

    The global torch random state is restored afterwards, so the caller's draws are unaffected.
    """
    transform = make_transform(corruption, severity)
    scale = intensity_scale(image, brain).view(-1, 1, 1, 1)
    scaled = image.float() / scale
    # Array axes (H, W, D) in the order the transform receives them; the affine's columns follow the same order.
    order = [0, 1, 2]
    if corruption == "motion":
        order = [axis for axis in order if axis != MOTION_KSPACE_AXIS] + [MOTION_KSPACE_AXIS]
    permuted_affine = np.asarray(affine, dtype=np.float64)[:, [*order, 3]]
    permuted = scaled.permute(0, *(axis + 1 for axis in order)).contiguous()
    subject = tio.Subject(image=tio.ScalarImage(tensor=permuted, affine=permuted_affine))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        corrupted = transform(subject)["image"].data.float()
    inverse = [order.index(axis) for axis in range(3)]
    corrupted = corrupted.permute(0, *(axis + 1 for axis in inverse))
    return (corrupted * scale).to(torch.float32).contiguous()


def parameter_table_markdown() -> str:
    """Return the Markdown table of every level's TorchIO parameters, the one in ``docs/corruptions.md``."""
    lines = ["| corruption | TorchIO transform | severity | parameters |", "|---|---|---|---|"]
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            parameters = level_parameters(corruption, severity)
            kwargs = ", ".join(f"`{key}={_format(value)}`" for key, value in parameters["kwargs"].items())
            lines.append(f"| {corruption} | `{parameters['transform']}` | {severity} | {kwargs} |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if isinstance(value, list):
        return "(" + ", ".join(_format(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
