"""Reliability diagrams from bin statistics pooled over the cases of a domain.

Bin statistics are sums (voxel count, confidence sum, correct count per equal-width confidence bin), so the
statistics of a domain are the sums of its cases' statistics, and the pooled ECE weighs every voxel of the
domain equally. The mean of per-case ECE weighs every case equally instead; reports give both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .calibration import expected_calibration_error_from_bins

BIN_KEYS = ("count", "conf_sum", "correct_sum")

__all__ = ["BIN_KEYS", "add_case_bins", "plot_reliability_diagram", "pooled_ece"]


def add_case_bins(
    pooled: dict,
    case_bins: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    domain: str,
    region_names: Sequence[str],
) -> dict:
    """Add one case's bin statistics into ``pooled``, keyed ``(domain, region, voxel set)``.

    Args:
        pooled: dict to update in place; values are ``{"count", "conf_sum", "correct_sum"}`` float64 arrays
            ``(n_bins,)``.
        case_bins: the second output of ``case_metrics.evaluate_case``: ``{set: {key: (K, n_bins)}}``.
        domain: the case's domain, for example a scanner or corruption name.
        region_names: one name per channel K.

    Returns:
        ``pooled``.
    """
    for set_name, bins in case_bins.items():
        arrays = {key: np.asarray(torch.as_tensor(bins[key], dtype=torch.float64)) for key in BIN_KEYS}
        if arrays["count"].shape[0] != len(region_names):
            raise ValueError(
                f"Bin statistics of set {set_name!r} have {arrays['count'].shape[0]} channels but region_names "
                f"{tuple(region_names)} has {len(region_names)}."
            )
        for channel, region in enumerate(region_names):
            entry = pooled.setdefault((domain, region, set_name), {key: 0.0 for key in BIN_KEYS})
            for key in BIN_KEYS:
                entry[key] = entry[key] + arrays[key][channel]
    return pooled


def pooled_ece(bins: Mapping[str, np.ndarray]) -> float:
    """Return the ECE of pooled ``(n_bins,)`` statistics, NaN when they hold no voxel."""
    as_rows = {key: torch.as_tensor(np.asarray(bins[key], dtype=np.float64)).reshape(1, -1) for key in BIN_KEYS}
    return float(expected_calibration_error_from_bins(as_rows)[0])


def plot_reliability_diagram(bins: Mapping[str, np.ndarray], path: str, title: str) -> None:
    """Write a reliability diagram as PNG: accuracy per confidence bin over the identity, and bin counts.

    The upper panel draws each non-empty bin's accuracy as a bar and its mean confidence as a red tick; the
    identity line is perfect calibration. The lower panel gives voxel counts per bin on a log scale. Only
    bins from 0.5 up are drawn, since top-label confidence never falls below 0.5.

    Args:
        bins: ``count``, ``conf_sum`` and ``correct_sum`` arrays ``(n_bins,)``.
        path: PNG file or binary file object.
        title: figure title; it should name the voxel set and the ECE.
    """
    count = np.asarray(bins["count"], dtype=np.float64)
    n_bins = len(count)
    filled = count > 0
    safe_count = np.where(filled, count, 1.0)
    accuracy = np.asarray(bins["correct_sum"], dtype=np.float64) / safe_count
    confidence = np.asarray(bins["conf_sum"], dtype=np.float64) / safe_count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    first_shown = int(np.floor(0.5 * n_bins))  # the bin holding confidence 0.5

    # A bare Figure renders with the Agg canvas and leaves pyplot's global state and backend alone.
    figure = Figure(figsize=(5.5, 6.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], accuracy[filled], width=width * 0.95, color="#4477aa", label="accuracy")
    top.scatter(centres[filled], confidence[filled], marker="_", s=300, color="#cc3311", label="mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="black", zorder=3, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title, fontsize=10)

    bottom.bar(centres[filled], count[filled], width=width * 0.95, color="#777777")
    if filled.any():
        bottom.set_yscale("log")
    bottom.set_ylabel("voxels")
    bottom.set_xlabel("top-label confidence max(p, 1 - p)")
    bottom.set_xlim(edges[first_shown], 1.0)
    figure.savefig(path, format="png", dpi=110)
