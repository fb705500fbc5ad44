"""Evaluation report: per-case CSV, summary JSON, Markdown table, reliability diagrams and MLflow logging.

Every file is written to a temporary file in the output folder and moved into place with ``os.replace``, so
a reader never sees a half-written report. The files:

- ``per_case.csv``: one row per case and region with every metric.
- ``summary.json``: per domain and region, mean, std (sample, ddof=1), median, count and ``n_nan`` of every
  metric, where count and the statistics leave out NaN and infinite values and ``n_nan`` counts them;
  pooled ECE and MCE per voxel set; the voxel set definitions, ``n_bins``, ``box_margin``, the empty-mask
  policies and the caller's ``settings``. Non-finite numbers are written as ``null``.
- ``report.md``: a Markdown table of the headline metrics, mean ± std per domain and region.
- ``reliability_<domain>_<region>.png``: reliability diagram of the headline ``box`` set, pooled over the
  cases of the domain.

MLflow: when a run is active or given, the summary means are logged as metrics named
``<domain>/<region>/<metric>`` (pooled values as ``<domain>/<region>/pooled_ece_<set>``) and the files as
artifacts under ``evaluation/``. NaN and infinite values are not logged as metrics, because MLflow would
store them as NaN and break comparisons across runs. Their number is logged as
``report/n_skipped_nonfinite``.
Characters MLflow rejects in a name become ``_``. An MLflow error is logged as a warning and never raised,
because the report is already on disk by then.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .atomic_files import temporary_sibling
from .calibration import NLL_EPS, expected_calibration_error_from_bins, maximum_calibration_error_from_bins
from .overlap import DICE_EMPTY_POLICY, DISTANCE_EMPTY_POLICY, HD_PERCENTILE
from .reliability import BIN_KEYS, plot_reliability_diagram
from .voxel_sets import VOXEL_SET_DEFINITIONS

logger = logging.getLogger(__name__)

HEADLINE_SET = "box"
ID_COLUMNS = ("case_id", "domain", "region")
# (row key, column title, decimals) of the Markdown table.
TABLE_COLUMNS = (
    ("dice", "Dice", 3),
    ("dice_box_fill", "Dice, box fill", 3),
    ("hd95_mm", "HD95 (mm)", 2),
    ("ece_box", "ECE (box)", 4),
    ("ace_box", "ACE (box)", 4),
    ("brier_box", "Brier (box)", 4),
    ("nll_box", "NLL (box)", 3),
)
_MLFLOW_BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call

__all__ = ["write_report"]


def _write_atomic(path: Path, write: Callable, *, binary: bool = False) -> None:
    """Write through ``write(file)`` into a temporary file next to ``path``, then rename it to ``path``."""
    handle, temporary = temporary_sibling(path)
    try:
        if binary:
            file = os.fdopen(handle, "wb")
        else:
            file = os.fdopen(handle, "w", newline="", encoding="utf-8")
        with file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _finite_or_none(value):
    """Turn NaN and infinity into None, recursively, so that the JSON file stays standard JSON."""
    if isinstance(value, Mapping):
        return {str(key): _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _finite_or_none(value.tolist())
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _metric_keys(rows: Sequence[Mapping]) -> list[str]:
    """Return the numeric metric keys of the rows, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ID_COLUMNS and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                keys.setdefault(key, None)
    return list(keys)


def _describe(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    count = int(finite.size)
    return {
        "mean": float(finite.mean()) if count else math.nan,
        "std": float(finite.std(ddof=1)) if count > 1 else math.nan,
        "median": float(np.median(finite)) if count else math.nan,
        "count": count,
        "n_nan": int(array.size - count),
    }


def _summarise_metrics(rows: Sequence[Mapping], metric_keys: list[str]) -> tuple[dict, dict]:
    """Return ``{domain: {region: {metric: statistics}}}`` and the number of cases per domain."""
    grouped: dict[str, dict[str, list[Mapping]]] = {}
    case_ids: dict[str, set] = {}
    for row in rows:
        missing = [key for key in ID_COLUMNS if key not in row]
        if missing:
            raise ValueError(f"Report row {dict(row)!r} lacks the keys {missing}; every row needs {list(ID_COLUMNS)}.")
        domain, region = str(row["domain"]), str(row["region"])
        grouped.setdefault(domain, {}).setdefault(region, []).append(row)
        case_ids.setdefault(domain, set()).add(row["case_id"])
    metrics = {
        domain: {
            region: {key: _describe([row.get(key, math.nan) for row in region_rows]) for key in metric_keys}
            for region, region_rows in regions.items()
        }
        for domain, regions in grouped.items()
    }
    return metrics, {domain: len(ids) for domain, ids in case_ids.items()}


def _pooled_calibration(bin_stats: Mapping) -> dict:
    """Return ``{domain: {region: {set: {"ece", "mce", "n_voxels"}}}}`` from pooled bin statistics."""
    pooled: dict = {}
    for (domain, region, set_name), bins in bin_stats.items():
        rows = {key: torch.as_tensor(np.asarray(bins[key], dtype=np.float64)).reshape(1, -1) for key in BIN_KEYS}
        pooled.setdefault(str(domain), {}).setdefault(str(region), {})[str(set_name)] = {
            "ece": float(expected_calibration_error_from_bins(rows)[0]),
            "mce": float(maximum_calibration_error_from_bins(rows)[0]),
            "n_voxels": int(rows["count"].sum()),
        }
    return pooled


def _n_bins(bin_stats: Mapping) -> int | None:
    sizes = {len(np.asarray(bins["count"])) for bins in bin_stats.values()}
    if len(sizes) > 1:
        raise ValueError(f"All bin statistics must have the same number of bins, got sizes {sorted(sizes)}.")
    return sizes.pop() if sizes else None


def _write_csv(path: Path, rows: Sequence[Mapping], metric_keys: list[str]) -> None:
    columns = [*ID_COLUMNS, *metric_keys]

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})

    _write_atomic(path, write)


def _format_cell(statistics: Mapping | None, decimals: int) -> str:
    if not statistics or statistics["count"] == 0:
        return "n/a"
    mean, std = statistics["mean"], statistics["std"]
    if std is None or not math.isfinite(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _markdown(summary: Mapping, diagrams: Sequence[str]) -> str:
    lines = [
        "# CalSAM evaluation report",
        "",
        "Mean ± sample standard deviation over cases; NaN values (empty voxel sets) are left out.",
        f"Calibration columns use the `{HEADLINE_SET}` voxel set: {VOXEL_SET_DEFINITIONS[HEADLINE_SET]}",
        "",
        "| Domain | Region | Cases | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|---|---|---:|" + "---:|" * len(TABLE_COLUMNS),
    ]
    for domain, regions in summary["metrics"].items():
        for region, statistics in regions.items():
            cells = [_format_cell(statistics.get(key), decimals) for key, _, decimals in TABLE_COLUMNS]
            lines.append(f"| {domain} | {region} | {summary['n_cases'][domain]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "- Dice, box fill: the Dice of the prompt boxes themselves, filled, a reference predictor without a network.",
        f"- Dice with empty masks: {summary['dice_empty_policy']}",
        f"- HD95 and ASSD with empty masks: {summary['distance_empty_policy']}",
        f"- Confidence bins: {summary['n_bins']}; box margin (H, W, D voxels): {summary['box_margin']}.",
        "",
        "Reliability diagrams: " + (", ".join(f"[{name}]({name})" for name in diagrams) or "none"),
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(summary["settings"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _file_token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def _write_diagrams(out_dir: Path, bin_stats: Mapping, pooled: Mapping) -> list[Path]:
    paths = []
    for (domain, region, set_name), bins in bin_stats.items():
        if set_name != HEADLINE_SET:
            continue
        path = out_dir / f"reliability_{_file_token(domain)}_{_file_token(region)}.png"
        values = pooled[str(domain)][str(region)][set_name]
        ece = values["ece"]
        ece_text = "n/a" if not math.isfinite(ece) else f"{100 * ece:.2f} %"
        title = f"{domain} / {region}, voxel set '{set_name}': pooled ECE {ece_text}, {values['n_voxels']} voxels"
        _write_atomic(path, functools.partial(plot_reliability_diagram, bins, title=title), binary=True)
        paths.append(path)
    return paths


def _mlflow_metrics(summary: Mapping) -> tuple[dict[str, float], int]:
    """Flatten summary means into MLflow metric names; return them and the number of non-finite values skipped."""
    metrics: dict[str, float] = {}
    skipped = 0
    flat = []
    for domain, regions in summary["metrics"].items():
        for region, statistics in regions.items():
            flat += [(f"{domain}/{region}/{key}", values["mean"]) for key, values in statistics.items()]
    for domain, regions in summary["pooled_calibration"].items():
        for region, sets in regions.items():
            flat += [(f"{domain}/{region}/pooled_ece_{name}", values["ece"]) for name, values in sets.items()]
    for name, value in flat:
        if value is None or not math.isfinite(value):
            skipped += 1
            continue
        metrics[re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)] = float(value)
    return metrics, skipped


def _log_mlflow(summary: Mapping, files: Sequence[Path], mlflow_run) -> None:
    try:
        import mlflow
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if mlflow_run is None:
            mlflow_run = mlflow.active_run()
        if mlflow_run is None:
            return
        run_id = mlflow_run if isinstance(mlflow_run, str) else mlflow_run.info.run_id
        metrics, skipped = _mlflow_metrics(summary)
        metrics["report/n_skipped_nonfinite"] = float(skipped)
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, value, timestamp, 0) for key, value in metrics.items()]
        client = MlflowClient()
        for start in range(0, len(entries), _MLFLOW_BATCH):
            client.log_batch(run_id, metrics=entries[start : start + _MLFLOW_BATCH])
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
        logger.info("Logged %d report metrics (%d non-finite skipped) to MLflow run %s.", len(entries), skipped, run_id)
    except Exception as error:
        # Any tracking failure (store, network, permissions) is only logged: the report is already on disk.
        logger.warning("MLflow logging of the evaluation report failed and was skipped: %r", error)


def write_report(
    rows: Sequence[Mapping],
    bin_stats: Mapping,
    out_dir: str | os.PathLike,
    *,
    settings: Mapping,
    mlflow_run=None,
    box_margin: Sequence[int] | None = None,
) -> dict:
    """Write per_case.csv, summary.json, report.md and reliability diagrams, and log them to MLflow.

    Args:
        rows: one dict per case and region: ``case_id``, ``domain``, ``region`` and numeric metrics, for
            example the rows of ``case_metrics.evaluate_case`` with ``case_id`` and ``domain`` added.
        bin_stats: ``{(domain, region, voxel set): {"count", "conf_sum", "correct_sum"}}`` with ``(n_bins,)``
            arrays summed over the domain's cases, as built by ``reliability.add_case_bins``.
        out_dir: output folder, created if missing.
        settings: free JSON-compatible description of the run (checkpoint, data, temperature, ...).
        mlflow_run: an MLflow ``Run``/``ActiveRun`` or run id; the active run if ``None``; no logging if neither.
        box_margin: the box set's dilation; ``settings["box_margin"]`` if ``None``.

    Returns:
        The summary as written to summary.json, with ``None`` in place of NaN.

    Raises:
        ValueError: a row lacks ``case_id``, ``domain`` or ``region``, or the bin counts differ in length.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    metric_keys = _metric_keys(rows)
    metrics, n_cases = _summarise_metrics(rows, metric_keys)
    if box_margin is None:
        box_margin = settings.get("box_margin")
    if box_margin is None:
        warnings.warn("write_report got no box_margin; summary.json records null for it.", stacklevel=2)
    pooled = _pooled_calibration(bin_stats)
    summary = _finite_or_none(
        {
            "metrics": metrics,
            "n_cases": n_cases,
            "pooled_calibration": pooled,
            "voxel_sets": VOXEL_SET_DEFINITIONS,
            "n_bins": _n_bins(bin_stats),
            "box_margin": None if box_margin is None else [int(m) for m in box_margin],
            "dice_empty_policy": DICE_EMPTY_POLICY,
            "distance_empty_policy": DISTANCE_EMPTY_POLICY,
            "hd_percentile": HD_PERCENTILE,
            "nll_eps": NLL_EPS,
            "settings": dict(settings),
        }
    )

    _write_csv(out_dir / "per_case.csv", rows, metric_keys)
    _write_atomic(out_dir / "summary.json", lambda f: json.dump(summary, f, indent=2, allow_nan=False))
    diagrams = _write_diagrams(out_dir, bin_stats, pooled)
    _write_atomic(out_dir / "report.md", lambda f: f.write(_markdown(summary, [p.name for p in diagrams])))
    files = [out_dir / "per_case.csv", out_dir / "summary.json", out_dir / "report.md", *diagrams]
    logger.info("Wrote the evaluation report of %d rows to %s.", len(rows), out_dir)

    _log_mlflow(summary, files, mlflow_run)
    return summary
