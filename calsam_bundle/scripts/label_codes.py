"""Turn region channels back into a data set's label codes, the inverse of ``regions.label_to_regions``.

Nested regions are painted from the largest to the smallest, and each region paints the one code that it
contains and no smaller region contains. For BraTS 2021 that is WT -> 2, then TC -> 1, then ET -> 4, so a voxel
in ET ends as 4, a voxel in TC but not ET as 1, and one in WT but not TC as 2. Regions that a prediction does not
nest (ET outside TC) still get their own code, because a later, smaller region overwrites an earlier one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform

from .regions import LabelConvention, get_convention


def paint_order(convention: LabelConvention) -> list[tuple[int, int]]:
    """Return ``(region index, code)`` pairs in painting order, largest region first.

    Raises:
        ValueError: a region does not own exactly one code once its nested regions are removed.
    """
    members = [set(codes) for codes in convention.regions.values()]
    order = []
    for index, codes in enumerate(members):
        nested = set().union(*(other for other in members if other < codes))
        own = codes - nested
        if len(own) != 1:
            raise ValueError(
                f"Region {convention.region_names[index]!r} of convention {convention.name!r} owns codes "
                f"{sorted(own)} after removing its nested regions; a label map needs exactly one code per region."
            )
        order.append((index, own.pop()))
    return sorted(order, key=lambda pair: -len(members[pair[0]]))


def regions_to_label(regions: torch.Tensor, convention: LabelConvention, dtype: torch.dtype = torch.uint8):
    """Paint ``(K, H, W, D)`` bool region channels into a ``(H, W, D)`` label map of the convention's codes.

    Raises:
        ValueError: the number of channels differs from the convention's regions.
    """
    k = regions.shape[0]
    if k != len(convention.regions):
        raise ValueError(
            f"Got {k} region channels but convention {convention.name!r} has {len(convention.regions)} "
            f"({', '.join(convention.region_names)}); use the label convention the model was trained with."
        )
    label = torch.zeros(regions.shape[1:], dtype=dtype, device=regions.device)
    for index, code in paint_order(convention):
        label[regions[index].bool()] = code
    return label


class ProbabilitiesToLabeld(MapTransform):
    """Threshold ``(K, H, W, D)`` region probabilities at ``threshold`` and store ``(1, H, W, D)`` label codes.

    Args:
        keys: keys of the probability maps.
        label_convention: a name in ``regions.LABEL_CONVENTIONS``.
        threshold: probability from which a voxel belongs to a region.
    """

    def __init__(self, keys, label_convention: str = "brats2021", threshold: float = 0.5) -> None:
        super().__init__(keys)
        self.convention = get_convention(label_convention)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = torch.as_tensor(d[key])
            label = regions_to_label(probabilities >= self.threshold, self.convention)
            d[key] = label.unsqueeze(0)
        return d
