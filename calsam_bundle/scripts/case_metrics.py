"""Per-case evaluation and MONAI cumulative metrics built on the calibration and overlap functions.

``evaluate_case`` returns every metric of one case as table rows. ``CalibrationMetrics`` and
``SurfaceDistanceMetric`` follow the layout of MONAI's cumulative metrics: calling them returns unreduced
``(B, K)`` values per case and channel (NaN where undefined) and buffers them, and ``aggregate()`` reduces
the buffer while leaving out NaN. The Ignite handlers in ``metric_handlers`` wrap these classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import MetricReduction

from .calibration import (
    DEFAULT_N_BINS,
    BinStatistics,
    adaptive_calibration_error,
    as_bool_tensor,
    as_probability_tensor,
    brier_score,
    compute_calibration,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .overlap import dice, surface_distances_mm, validate_spacing
from .voxel_sets import VOXEL_SET_NAMES, build_voxel_sets

CALIBRATION_METRICS = {
    "ece": expected_calibration_error,
    "ace": adaptive_calibration_error,
    "mce": maximum_calibration_error,
    "brier": brier_score,
    "nll": negative_log_likelihood,
}
DEFAULT_BOX_MARGIN = (5, 5, 1)
DEFAULT_REGION_NAMES = ("TC", "WT", "ET")

__all__ = [
    "CALIBRATION_METRICS",
    "DEFAULT_BOX_MARGIN",
    "DEFAULT_REGION_NAMES",
    "CalibrationMetrics",
    "SurfaceDistanceMetric",
    "evaluate_case",
    "metric_columns",
]


def metric_columns(voxel_sets: Sequence[str] = VOXEL_SET_NAMES) -> list[str]:
    """Return the metric keys of an ``evaluate_case`` row in table order."""
    columns = ["dice", "dice_box_fill", "hd95_mm", "assd_mm"]
    for name in voxel_sets:
        columns += [f"{metric}_{name}" for metric in CALIBRATION_METRICS] + [f"n_voxels_{name}"]
    return columns


def evaluate_case(
    prob,
    label,
    box_mask,
    brain_mask,
    spacing,
    *,
    n_bins: int = DEFAULT_N_BINS,
    box_margin: Sequence[int] = DEFAULT_BOX_MARGIN,
    region_names: Sequence[str] = DEFAULT_REGION_NAMES,
) -> tuple[list[dict], dict[str, BinStatistics]]:
    """Compute overlap, surface distance and calibration metrics of one case, per region.

    The prediction is ``prob >= 0.5``. ``dice_box_fill`` is the Dice of the prompt boxes themselves, filled, as
    a reference predictor that uses no network. Calibration metrics are computed over every voxel set of
    ``voxel_sets.VOXEL_SET_NAMES``.

    Args:
        prob: ``(K, H, W, D)`` sigmoid probabilities.
        label: ``(K, H, W, D)`` bool ground truth.
        box_mask: ``(K, H, W, D)`` bool prompt boxes, empty on slices without a prompt.
        brain_mask: ``(H, W, D)`` bool.
        spacing: voxel size in mm along H, W, D, in native space.
        n_bins: equal-width confidence bins for ECE and MCE, equal-mass groups for ACE.
        box_margin: ``(m_h, m_w, m_d)`` dilation of the prompt boxes in voxels.
        region_names: one name per channel.

    Returns:
        ``(rows, bins)``. ``rows`` has one dict per region with ``region`` and the keys of
        ``metric_columns()``: floats, NaN where a voxel set is empty, and ints for ``n_voxels_<set>``.
        ``bins`` is ``{set: BinStatistics}`` with ``(K, n_bins)`` tensors, for pooling reliability diagrams
        over cases.

    Raises:
        TypeError, ValueError: invalid inputs, naming the argument.
    """
    prob = as_probability_tensor("prob", prob)
    label = as_bool_tensor("label", label)
    if prob.ndim != 4:
        raise ValueError(f"prob must have shape (K, H, W, D), got {tuple(prob.shape)}.")
    if label.shape != prob.shape:
        raise ValueError(f"label has shape {tuple(label.shape)} but prob has {tuple(prob.shape)}; they must match.")
    region_names = tuple(region_names)
    k = prob.shape[0]
    if len(region_names) != k:
        raise ValueError(f"region_names {region_names} must name each of the {k} channels of prob.")
    spacing = validate_spacing(spacing)

    pred = prob >= 0.5
    dice_values = dice(pred, label)
    hd95, assd = surface_distances_mm(pred, label, spacing)
    # The prompt alone as a predictor: every prompt box filled. A decoder that does not beat it has learned
    # nothing beyond the box it was given.
    box_fill = dice(as_bool_tensor("box_mask", box_mask), label)
    columns: dict[str, torch.Tensor] = {
        "dice": dice_values,
        "dice_box_fill": box_fill,
        "hd95_mm": hd95,
        "assd_mm": assd,
    }

    sets = build_voxel_sets(label, prob, box_mask, brain_mask, box_margin)
    flat_prob, flat_label = prob.reshape(k, -1), label.reshape(k, -1)
    bins: dict[str, BinStatistics] = {}
    for name, voxel_set in sets.items():
        # No mask for the whole volume skips gathering its voxels.
        mask = None if name == "volume" else voxel_set.reshape(k, -1)
        result = compute_calibration(flat_prob, flat_label, mask, n_bins)
        for metric in CALIBRATION_METRICS:
            columns[f"{metric}_{name}"] = getattr(result, metric)
        columns[f"n_voxels_{name}"] = result.n_voxels
        bins[name] = result.bins

    rows = []
    for channel, region in enumerate(region_names):
        row: dict = {"region": region}
        for key, values in columns.items():
            value = values[channel].item()
            row[key] = int(value) if key.startswith("n_voxels_") else float(value)
        rows.append(row)
    return rows, bins


def _item_kwargs(kwargs: dict, index: int, n_items: int) -> dict:
    """Pick item ``index`` of every keyword given per item, adding a batch dimension of one."""
    picked = {}
    for key, value in kwargs.items():
        per_item = isinstance(value, (list, tuple)) and len(value) == n_items
        per_item = per_item and all(isinstance(v, (torch.Tensor, list, tuple)) or hasattr(v, "shape") for v in value)
        picked[key] = torch.as_tensor(value[index]).unsqueeze(0) if per_item else value
    return picked


class _PerCaseMetric(CumulativeIterationMetric):
    """A cumulative metric computed case by case on batch-first tensors, reduced with NaN ignored."""

    def __init__(self, metric_reduction: MetricReduction | str, get_not_nans: bool) -> None:
        super().__init__()
        self.metric_reduction = metric_reduction
        self.get_not_nans = get_not_nans

    def _compute_list(self, y_pred, y=None, **kwargs):
        # MONAI passes keyword arguments unchanged to every item; per-item masks and spacings must be split.
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y, got None.")
        results = [
            self._compute_tensor(
                torch.as_tensor(p).unsqueeze(0), torch.as_tensor(t).unsqueeze(0), **_item_kwargs(kwargs, i, len(y))
            )
            for i, (p, t) in enumerate(zip(y_pred, y))
        ]
        return torch.cat(results, dim=0)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """Average the buffered ``(cases, K)`` values, leaving out NaN.

        Unlike MONAI's ``do_metric_reduction``, which returns 0 when every value is NaN, an average without
        any finite value stays NaN here: 0 would read as a perfect calibration error or distance.

        Args:
            reduction: ``"mean_batch"`` for one mean per channel ``(K,)``, ``"mean"`` for one mean over all
                cases and channels, ``"none"`` for the buffer; ``self.metric_reduction`` by default.

        Returns:
            The float64 result, and the number of non-NaN values behind each entry if ``get_not_nans``.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no buffered values to aggregate; call it on a batch first.")
        data = data.double()
        mode = MetricReduction(reduction or self.metric_reduction)
        not_nan = ~torch.isnan(data)
        if mode == MetricReduction.NONE:
            reduced, count = data, not_nan.double()
        elif mode == MetricReduction.MEAN_BATCH:
            count = not_nan.sum(dim=0).double()
            reduced = torch.nansum(data, dim=0) / count  # 0 / 0 is NaN
        elif mode == MetricReduction.MEAN:
            count = not_nan.sum().double()
            reduced = torch.nansum(data) / count
        else:
            raise ValueError(f"reduction must be 'mean', 'mean_batch' or 'none', got {mode.value!r}.")
        return (reduced, count) if self.get_not_nans else reduced


def _validate_batch(y_pred, y) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(y_pred, torch.Tensor) and y_pred.dtype == torch.bool:
        y_pred = y_pred.float()
    y_pred = as_probability_tensor("y_pred", y_pred)
    y = as_bool_tensor("y", y)
    if y_pred.ndim != 5:
        raise ValueError(f"y_pred must have shape (B, K, H, W, D), got {tuple(y_pred.shape)}.")
    if y.shape != y_pred.shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but y_pred has {tuple(y_pred.shape)}; they must match.")
    return y_pred, y


def _case_spacing(spacing, batch_size: int) -> list[tuple[float, float, float]]:
    if spacing is None:
        raise ValueError("spacing is required: pass the voxel size in mm along (H, W, D) as `spacing`.")
    values = torch.as_tensor(spacing, dtype=torch.float64)
    if values.ndim == 2:
        if values.shape[0] != batch_size:
            raise ValueError(f"spacing has {values.shape[0]} rows for a batch of {batch_size} cases.")
        return [validate_spacing(row) for row in values]
    return [validate_spacing(values)] * batch_size


class CalibrationMetrics(_PerCaseMetric):
    """One calibration metric over one voxel set, per case and region channel.

    Call with ``y_pred`` ``(B, K, H, W, D)`` probabilities, ``y`` ``(B, K, H, W, D)`` labels and, as the
    voxel set needs, ``box_mask`` ``(B, K, H, W, D)`` and ``brain_mask`` ``(B, H, W, D)`` or
    ``(B, 1, H, W, D)``. Lists of channel-first tensors are accepted, with the masks as lists too.

    Args:
        metric: ``"ece"``, ``"ace"``, ``"mce"``, ``"brier"`` or ``"nll"``.
        voxel_set: a name of ``voxel_sets.VOXEL_SET_NAMES``; ``"box"`` is the headline set.
        n_bins: bins (or equal-mass groups for ACE).
        box_margin: ``(m_h, m_w, m_d)`` dilation of the prompt boxes in voxels.
        metric_reduction: reduction of ``aggregate()``; ``"mean_batch"`` gives the NaN-ignoring mean per
            channel, ``"mean"`` one scalar over cases and channels.
        get_not_nans: whether ``aggregate()`` also returns the count of non-NaN values.
    """

    def __init__(
        self,
        metric: str = "ece",
        voxel_set: str = "box",
        n_bins: int = DEFAULT_N_BINS,
        box_margin: Sequence[int] = DEFAULT_BOX_MARGIN,
        metric_reduction: MetricReduction | str = MetricReduction.MEAN_BATCH,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(metric_reduction, get_not_nans)
        if metric not in CALIBRATION_METRICS:
            raise ValueError(f"Unknown calibration metric {metric!r}; choose from {list(CALIBRATION_METRICS)}.")
        if voxel_set not in VOXEL_SET_NAMES:
            raise ValueError(f"Unknown voxel set {voxel_set!r}; choose from {list(VOXEL_SET_NAMES)}.")
        self.metric = metric
        self.voxel_set = voxel_set
        self.n_bins = n_bins
        self.box_margin = tuple(box_margin)

    def _compute_tensor(self, y_pred, y=None, box_mask=None, brain_mask=None, **kwargs) -> torch.Tensor:
        """Return ``(B, K)`` float64 values, NaN where a case's voxel set of a channel is empty."""
        y_pred, y = _validate_batch(y_pred, y)
        b, k = y_pred.shape[:2]
        values = []
        for case in range(b):
            sets = build_voxel_sets(
                y[case],
                y_pred[case],
                None if box_mask is None else torch.as_tensor(box_mask)[case],
                None if brain_mask is None else torch.as_tensor(brain_mask)[case],
                self.box_margin,
                names=[self.voxel_set],
            )
            mask = None if self.voxel_set == "volume" else sets[self.voxel_set].reshape(k, -1)
            values.append(self._metric_values(y_pred[case].reshape(k, -1), y[case].reshape(k, -1), mask))
        return torch.stack(values)

    def _metric_values(self, prob: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        metric_fn = CALIBRATION_METRICS[self.metric]
        if self.metric in ("brier", "nll"):
            return metric_fn(prob, label, mask)
        return metric_fn(prob, label, mask, n_bins=self.n_bins)


class SurfaceDistanceMetric(_PerCaseMetric):
    """HD95 or ASSD in mm per case and region channel, with the empty-mask policy of ``overlap``.

    Call with ``y_pred`` ``(B, K, H, W, D)`` probabilities or binary masks, ``y`` ``(B, K, H, W, D)`` labels
    and ``spacing``: three voxel sizes in mm shared by the batch, or ``(B, 3)``.

    Args:
        distance: ``"hd95"`` or ``"assd"``.
        threshold: ``y_pred >= threshold`` is the predicted mask.
        metric_reduction, get_not_nans: as in ``CalibrationMetrics``.
    """

    def __init__(
        self,
        distance: str = "hd95",
        threshold: float = 0.5,
        metric_reduction: MetricReduction | str = MetricReduction.MEAN_BATCH,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(metric_reduction, get_not_nans)
        if distance not in ("hd95", "assd"):
            raise ValueError(f"distance must be 'hd95' or 'assd', got {distance!r}.")
        self.distance = distance
        self.threshold = threshold

    def _compute_tensor(self, y_pred, y=None, spacing=None, **kwargs) -> torch.Tensor:
        """Return ``(B, K)`` float64 distances in mm, never NaN."""
        y_pred, y = _validate_batch(y_pred, y)
        spacings = _case_spacing(spacing, y_pred.shape[0])
        values = []
        for case, case_spacing in enumerate(spacings):
            hd95, assd = surface_distances_mm(y_pred[case] >= self.threshold, y[case], case_spacing)
            values.append(hd95 if self.distance == "hd95" else assd)
        return torch.stack(values)
