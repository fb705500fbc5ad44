"""Label conventions and their conversion to overlapping sigmoid region channels.

BraTS labels are nested: the whole tumour (WT) contains the tumour core (TC), which contains the enhancing
tumour (ET). Networks predict these regions as independent sigmoid channels rather than the label codes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import MapTransform


@dataclass(frozen=True)
class LabelConvention:
    """Label codes of a data set and the codes that make up each region channel."""

    name: str
    codes: dict[int, str]
    regions: dict[str, tuple[int, ...]]

    @property
    def region_names(self) -> tuple[str, ...]:
        """Region channel names in channel order."""
        return tuple(self.regions)


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    # BraTS 2018-2022: 1 necrotic core, 2 oedema, 4 enhancing tumour.
    "brats2021": LabelConvention(
        "brats2021",
        {0: "background", 1: "necrotic core", 2: "oedema", 4: "enhancing tumour"},
        {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)},
    ),
    # BraTS 2023 codes the enhancing tumour as 3.
    "brats2023": LabelConvention(
        "brats2023",
        {0: "background", 1: "necrotic core", 2: "oedema", 3: "enhancing tumour"},
        {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)},
    ),
    # One lesion channel, for example ATLAS v2.0 stroke masks.
    "binary": LabelConvention("binary", {0: "background", 1: "lesion"}, {"lesion": (1,)}),
}


def get_convention(name: str) -> LabelConvention:
    """Return the named convention or raise a ValueError listing the known ones."""
    if name not in LABEL_CONVENTIONS:
        raise ValueError(f"Unknown label convention {name!r}; choose one of {sorted(LABEL_CONVENTIONS)}.")
    return LABEL_CONVENTIONS[name]


def check_label_values(label: np.ndarray | torch.Tensor, convention: LabelConvention, source: str) -> None:
    """Raise a ValueError naming ``source`` and the offending values if any label code is not in the convention."""
    values = torch.unique(torch.as_tensor(label)).tolist()
    unexpected = sorted(v for v in values if v not in convention.codes)
    if unexpected:
        raise ValueError(
            f"Label file {source!r} contains values {unexpected} outside the {convention.name!r} convention "
            f"(allowed {sorted(convention.codes)}). Choose the matching label_convention "
            f"({', '.join(sorted(LABEL_CONVENTIONS))}) or fix the label file."
        )


def label_to_regions(label: torch.Tensor, convention: LabelConvention) -> torch.Tensor:
    """Convert a ``(H, W, D)`` or ``(1, H, W, D)`` label map to ``(K, H, W, D)`` bool region channels."""
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise ValueError(f"A label map has one channel, got shape {tuple(label.shape)}.")
        label = label[0]
    codes = label.round().to(torch.int64)
    channels = [torch.isin(codes, torch.tensor(members)) for members in convention.regions.values()]
    return torch.stack(channels, dim=0)


class LabelToRegionsd(MapTransform):
    """Check label codes against a convention and replace the label by ``(K, H, W, D)`` region channels.

    Args:
        keys: label keys.
        convention: a name in ``LABEL_CONVENTIONS``.
        source_key: item key holding the label file name used in error messages.
    """

    def __init__(self, keys, convention: str = "brats2021", source_key: str = "label_path") -> None:
        super().__init__(keys)
        self.convention = get_convention(convention)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            check_label_values(label, self.convention, str(d.get(self.source_key, key)))
            d[key] = label_to_regions(label, self.convention)
        return d
