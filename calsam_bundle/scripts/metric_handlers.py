"""Ignite metric handlers for the box-set ECE and HD95 in mm, for MONAI evaluators.

Both read ``pred`` ``(1, K, H, W, D)`` probabilities and ``label`` ``(1, K, H, W, D)`` through
``output_transform`` (``from_engine(["pred", "label"])`` by default) and take the extra inputs of each
case by key: ``box_mask`` ``(1, K, H, W, D)``, ``brain_mask`` ``(1, H, W, D)`` and ``spacing`` (three mm
values, or ``(1, 3)``). A key is looked up in ``engine.state.output`` first and in ``engine.state.batch``
second; either may be a dict or a decollated list of dicts. Batches of several same-sized volumes work too.

Example YAML for a bundle evaluator::

    key_val_metric:
      val_box_ece:
        _target_: scripts.metric_handlers.BoxCalibrationError
        output_transform: "$monai.handlers.from_engine(['pred', 'label'])"
    val_handlers: ...

ECE is better when lower: set ``key_metric_greater_or_equal`` or a ``metric_cmp_fn`` accordingly when it
selects checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.handlers import IgniteMetricHandler, from_engine
from monai.utils import MetricReduction

from .calibration import DEFAULT_N_BINS
from .case_metrics import DEFAULT_BOX_MARGIN, CalibrationMetrics, SurfaceDistanceMetric

PRED_LABEL = from_engine(["pred", "label"])

__all__ = ["PRED_LABEL", "BoxCalibrationError", "HausdorffDistance95", "engine_value"]


def engine_value(engine, key: str):
    """Return ``key`` from ``engine.state.output``, else from ``engine.state.batch``.

    A decollated list of dicts yields the list of the items' values.

    Raises:
        KeyError: neither place has the key.
    """
    for source in ("output", "batch"):
        data = getattr(engine.state, source, None)
        if isinstance(data, dict) and key in data:
            return data[key]
        if isinstance(data, list) and data and isinstance(data[0], dict) and key in data[0]:
            return [item[key] for item in data]
    raise KeyError(
        f"Key {key!r} is in neither engine.state.output nor engine.state.batch; the evaluator must put the "
        f"case's {key} into its output or batch dict."
    )


class _CaseInputsMetricHandler(IgniteMetricHandler):
    """An ``IgniteMetricHandler`` whose metric also takes per-case inputs read from the engine by key."""

    def __init__(
        self,
        metric_fn,
        input_keys: Sequence[str],
        output_transform: Callable,
        save_details: bool,
    ) -> None:
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
        self.input_keys = tuple(input_keys)

    def iteration_completed(self, engine) -> None:
        # Ignite's default splits list outputs into items and calls update() per item, which would separate
        # the predictions from the masks. The metric handles lists and batches itself.
        self._is_reduced = False
        y_pred, y = self._output_transform(engine.state.output)
        inputs = {key: engine_value(engine, key) for key in self.input_keys}
        self.metric_fn(y_pred, y, **inputs)


class BoxCalibrationError(_CaseInputsMetricHandler):
    """Calibration error over a voxel set, the box set's ECE by default, averaged over cases and regions.

    Args:
        metric: ``"ece"``, ``"ace"``, ``"mce"``, ``"brier"`` or ``"nll"``.
        voxel_set: ``"box"`` (needs ``box_mask``), ``"brain"`` (needs ``brain_mask``), ``"foreground"``,
            ``"union"`` or ``"volume"``.
        n_bins: confidence bins.
        box_margin: ``(m_h, m_w, m_d)`` dilation of the prompt boxes in voxels.
        reduction: ``"mean"`` (default) gives one NaN-ignoring mean over cases and regions, as a key metric
            needs; ``"mean_batch"`` gives one value per region.
        output_transform: maps ``engine.state.output`` to ``(pred, label)``.
        save_details: whether to store the per-case ``(cases, K)`` values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        metric: str = "ece",
        voxel_set: str = "box",
        n_bins: int = DEFAULT_N_BINS,
        box_margin: Sequence[int] = DEFAULT_BOX_MARGIN,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = PRED_LABEL,
        save_details: bool = True,
    ) -> None:
        metric_fn = CalibrationMetrics(
            metric=metric, voxel_set=voxel_set, n_bins=n_bins, box_margin=box_margin, metric_reduction=reduction
        )
        input_keys = {"box": ("box_mask",), "brain": ("brain_mask",)}.get(voxel_set, ())
        super().__init__(metric_fn, input_keys, output_transform, save_details)


class HausdorffDistance95(_CaseInputsMetricHandler):
    """HD95 in mm of ``pred >= threshold``, averaged over cases and regions; needs ``spacing``.

    An empty prediction or ground truth (but not both) counts as the image diagonal in mm, both empty as 0.

    Args:
        threshold: probability threshold of the predicted mask.
        reduction, output_transform, save_details: as in ``BoxCalibrationError``.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = PRED_LABEL,
        save_details: bool = True,
    ) -> None:
        metric_fn = SurfaceDistanceMetric(distance="hd95", threshold=threshold, metric_reduction=reduction)
        super().__init__(metric_fn, ("spacing",), output_transform, save_details)
