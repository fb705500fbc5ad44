"""Write the report of a benchmark grid: tables, Wilcoxon tests, corruption curves and an MLflow parent run.

Files in the grid folder: ``results.md`` (everything below, for a docs page), ``results.csv`` (mean, std and
relative change per method, domain group and metric), ``gaps.csv``, ``wilcoxon.csv``, ``curves.csv``,
``training_time.csv`` and ``curve_<corruption>.png``. The same files and the headline numbers are logged to a
parent MLflow run named ``grid-report`` in the grid's experiment, and every run of the grid is tagged as its child.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .grid_config import GridConfig
from .grid_markdown import results_markdown
from .grid_results import METRICS, TEST_METRICS, GridResults, collect_results, read_json

logger = logging.getLogger(__name__)

__all__ = ["plot_curves", "write_grid_report"]


def plot_curves(curves: pd.DataFrame, corruption: str, labels: dict[str, str], path: Path) -> None:
    """Plot Dice and ECE against severity for one corruption, one line per method with std error bars."""
    figure = Figure(figsize=(9.0, 3.4), dpi=80)
    axes = figure.subplots(1, len(TEST_METRICS))
    for axis, metric in zip(axes, TEST_METRICS):
        _, title, unit, _, _ = METRICS[metric]
        for method, label in labels.items():
            rows = curves[
                (curves["method"] == method) & (curves["corruption"] == corruption) & (curves["metric"] == metric)
            ]
            if rows.empty:
                continue
            rows = rows.sort_values("severity")
            axis.errorbar(
                rows["severity"],
                rows["mean"],
                yerr=rows["std"].fillna(0.0),
                label=label,
                capsize=2,
                marker="o",
                markersize=3,
            )
        axis.set_xlabel("severity (0 = clean target)")
        axis.set_ylabel(f"{title} ({unit})")
        axis.set_xticks(sorted(curves["severity"].unique()))
        axis.grid(alpha=0.3)
    axes[0].set_title(f"{corruption}: mean ± std over seeds", fontsize=9)
    axes[-1].legend(fontsize=6, loc="best")
    figure.tight_layout()
    figure.savefig(path)


def _log_mlflow(grid: GridConfig, metrics: dict[str, float], files: list[Path]) -> None:
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        from .grid import tracking_settings

        mlflow.set_tracking_uri(tracking_settings(grid)["mlflow#tracking_uri"])
        experiment = mlflow.get_experiment_by_name(grid.experiment_name)
        if experiment is None:
            logger.warning("MLflow experiment %r not found; the grid report is not logged.", grid.experiment_name)
            return
        client = MlflowClient()
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="grid-report") as parent:
            mlflow.log_params(
                {"grid": str(grid.path), "seeds": str(list(grid.seeds)), "methods": ",".join(grid.methods)}
            )
            mlflow.log_metrics({key: value for key, value in metrics.items() if math.isfinite(value)})
            for path in files:
                mlflow.log_artifact(str(path), artifact_path="grid_report")
            runs = client.search_runs([experiment.experiment_id], max_results=5000)
            for run in runs:
                if run.info.run_id != parent.info.run_id and run.info.run_name != "grid-report":
                    client.set_tag(run.info.run_id, "mlflow.parentRunId", parent.info.run_id)
        logger.info("Logged the grid report to MLflow run %s.", parent.info.run_id)
    except Exception as error:
        # The report files are on disk already; a tracking failure must not hide them.
        logger.warning("MLflow logging of the grid report failed and was skipped: %r", error)


def _headline_metrics(summary: pd.DataFrame, gaps: pd.DataFrame, tests: pd.DataFrame) -> dict[str, float]:
    metrics = {}
    for row in summary.itertuples():
        metrics[f"{row.method}/{row.group}/{row.metric}_mean"] = float(row.mean)
        metrics[f"{row.method}/{row.group}/{row.metric}_std"] = float(row.std)
    for row in gaps.itertuples():
        metrics[f"{row.method}/gap_{row.metric}"] = float(row.gap)
        metrics[f"{row.method}/gap_reduction_{row.metric}"] = float(row.reduction)
    for row in tests.itertuples():
        metrics[f"wilcoxon/{row.a}_vs_{row.b}/{row.group}/{row.metric}_p"] = float(row.p_value)
    return metrics


def write_grid_report(grid: GridConfig, results: GridResults | None = None) -> dict[str, Path]:
    """Build every table and figure of the grid's finished runs and write them to the grid folder and MLflow.

    Returns:
        Paths of the written files by short name (``results_md``, ``results_csv``, ..., ``curve_<corruption>``).

    Raises:
        FileNotFoundError: no run of the grid has evaluation results.
    """
    results = results or collect_results(grid)
    folder = grid.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    summary = results.summary()
    gaps = results.gaps(summary)
    tests = results.wilcoxon()
    curves = results.curves()
    times = results.training_times()
    labels = {name: grid.methods[name].label for name in results.methods}

    paths = {
        "results_csv": folder / "results.csv",
        "gaps_csv": folder / "gaps.csv",
        "wilcoxon_csv": folder / "wilcoxon.csv",
        "curves_csv": folder / "curves.csv",
        "training_time_csv": folder / "training_time.csv",
    }
    for table, key in (
        (summary, "results_csv"),
        (gaps, "gaps_csv"),
        (tests, "wilcoxon_csv"),
        (curves, "curves_csv"),
        (times, "training_time_csv"),
    ):
        table.to_csv(paths[key], index=False)
    for corruption in sorted(curves["corruption"].unique()) if not curves.empty else []:
        path = folder / f"curve_{corruption}.png"
        plot_curves(curves, corruption, labels, path)
        paths[f"curve_{corruption}"] = path

    run_info = read_json(folder / "grid_run.json")
    figures = [paths[key].name for key in paths if key.startswith("curve_")]
    markdown = results_markdown(grid, results, summary, gaps, tests, times, run_info, figures)
    paths["results_md"] = folder / "results.md"
    paths["results_md"].write_text(markdown)
    logger.info("Wrote the grid report to %s", paths["results_md"])

    _log_mlflow(grid, _headline_metrics(summary, gaps, tests), list(paths.values()))
    return paths
