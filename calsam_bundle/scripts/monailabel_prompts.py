"""Carry MONAI Label's interactive prompts to the network as three extra image channels.

MONAI Label's bundle task hands every request field to the pre-transforms but calls the network with the
image tensor alone. This transform writes the request's clicks and ROI into channels after the image, which
``volume_network.CalSAMVolumeNet`` turns back into SAM point and box prompts. The request fields follow the
layout of MONAI Label 0.8.5's own SAM2 task (``monailabel/sam2/infer.py``):

- ``foreground`` and ``background``: ``[[i, j, k], ...]`` voxel indices along the image array axes, ``k`` the
  slice along the last axis;
- ``roi``: ``[i0, j0, i1, j1, k0, k1]``, a box of rows ``i0..i1 - 1`` and columns ``j0..j1 - 1`` on slices
  ``k0..k1 - 1`` (exclusive ends).

A request with none of them leaves the prompt channels empty, and the network then runs in automatic mode.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform


class AddPromptChannelsd(MapTransform):
    """Append foreground-click, background-click and ROI channels to a ``(C, H, W, D)`` image.

    Args:
        keys: image keys, channel first.
        foreground_key: request field with foreground clicks.
        background_key: request field with background clicks.
        roi_key: request field with the ROI box.
    """

    def __init__(
        self, keys, foreground_key: str = "foreground", background_key: str = "background", roi_key: str = "roi"
    ) -> None:
        super().__init__(keys)
        self.foreground_key = foreground_key
        self.background_key = background_key
        self.roi_key = roi_key

    def _click_map(self, clicks, shape: tuple[int, int, int], field: str) -> torch.Tensor:
        channel = torch.zeros(shape, dtype=torch.float32)
        for click in clicks or []:
            index = [int(round(float(v))) for v in click]
            if len(index) != 3 or not all(0 <= v < n for v, n in zip(index, shape)):
                raise ValueError(
                    f"Request field {field!r}: click {list(click)!r} is not an [i, j, k] voxel index inside an "
                    f"image of shape {shape}; send voxel indices of the image array."
                )
            channel[tuple(index)] = 1.0
        return channel

    def _roi_map(self, roi, shape: tuple[int, int, int]) -> torch.Tensor:
        channel = torch.zeros(shape, dtype=torch.float32)
        if not roi:
            return channel
        h, w, d = shape
        if len(roi) != 6:
            raise ValueError(f"Request field {self.roi_key!r} is [i0, j0, i1, j1, k0, k1], got {list(roi)!r}.")
        i0, j0, i1, j1, k0, k1 = (int(v) for v in roi)
        if not (0 <= i0 < i1 <= h and 0 <= j0 < j1 <= w and 0 <= k0 < k1 <= d):
            raise ValueError(
                f"Request field {self.roi_key!r}: ROI {list(roi)!r} must satisfy 0 <= i0 < i1 <= {h}, "
                f"0 <= j0 < j1 <= {w} and 0 <= k0 < k1 <= {d} (exclusive ends) for an image of shape {shape}."
            )
        channel[i0:i1, j0:j1, k0:k1] = 1.0
        return channel

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            shape = tuple(int(n) for n in image.shape[1:])
            guidance = torch.stack(
                [
                    self._click_map(d.get(self.foreground_key), shape, self.foreground_key),
                    self._click_map(d.get(self.background_key), shape, self.background_key),
                    self._roi_map(d.get(self.roi_key), shape),
                ]
            )
            # torch.cat keeps the MetaTensor's affine and meta data from the image, which the label writer uses.
            d[key] = torch.cat([torch.as_tensor(image).float(), guidance.to(image.device)], dim=0)
        return d
