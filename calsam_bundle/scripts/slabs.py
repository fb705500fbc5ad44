"""Data sets over prepared cases: training slabs of ``S`` consecutive embedded slices, and whole validation cases.

A slab is the unit FIP acts on: its embeddings form the 3D feature stack ``(S, 256, h, w)`` whose Fisher
trace is normalised per slab.

Both data sets keep the datalist entries their cases were prepared from as ``data``, the attribute name of MONAI
data sets. The configs set it as ``train#dataset#data`` and ``validate#dataset#data``, the keys that MONAI
Label's bundle training task replaces with its datastore's entries.
"""

from __future__ import annotations

from torch.utils.data import Dataset


class SlabDataset(Dataset):
    """Slabs of ``slab_size`` consecutive prepared slices with at least one prompted (slice, region) pair.

    Args:
        cases: output of ``cases.prepare_cases``.
        slab_size: ``S``, slices per slab.
        stride: step between slab starts; ``slab_size`` gives non-overlapping slabs.
        data: the entries ``cases`` were prepared from, one per case, or None.
    """

    def __init__(
        self, cases: list[dict], slab_size: int = 4, stride: int | None = None, data: list[dict] | None = None
    ) -> None:
        self.data = _check_entries(data, cases)
        if int(slab_size) < 1:
            raise ValueError(f"slab_size must be >= 1, got {slab_size}.")
        stride = int(stride or slab_size)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}.")
        self.cases = cases
        self.slab_size = int(slab_size)
        self.index: list[tuple[int, int]] = []
        for case_number, case in enumerate(cases):
            count = len(case["slice_index"])
            starts = list(range(0, max(count - self.slab_size, 0) + 1, stride))
            if count > self.slab_size and starts[-1] != count - self.slab_size:
                starts.append(count - self.slab_size)
            for start in starts:
                if bool(case["valid"][start : start + self.slab_size].any()):
                    self.index.append((case_number, start))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict:
        case_number, start = self.index[position]
        case = self.cases[case_number]
        window = slice(start, start + self.slab_size)
        return {
            "case_id": case["case_id"],
            "slice_index": case["slice_index"][window],
            "slices": case["slices"][window],
            "embeddings": case["embeddings"][window],
            "regions": case["regions"][window],
            "boxes": case["boxes"][window],
            "valid": case["valid"][window],
        }


class CaseDataset(Dataset):
    """Whole prepared cases, one item per case, for validation.

    Args:
        cases: output of ``cases.prepare_cases``.
        data: the entries ``cases`` were prepared from, one per case, or None.
    """

    def __init__(self, cases: list[dict], data: list[dict] | None = None) -> None:
        self.data = _check_entries(data, cases)
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, position: int) -> dict:
        return self.cases[position]


def _check_entries(data: list[dict] | None, cases: list[dict]) -> list[dict] | None:
    """Return ``data`` after checking that it has one entry per prepared case."""
    if data is not None and len(data) != len(cases):
        raise ValueError(
            f"Got {len(data)} data entries for {len(cases)} prepared cases. The cases must be prepared from the "
            "data set's own entries (train#cases from train#dataset#data, validate#cases from validate#dataset#data)."
        )
    return data


def first_item(batch: list) -> dict:
    """Collate function for ``batch_size=1``: a slab already is a batch of ``S`` slices."""
    return batch[0]
