"""Ignite handler that scores each evaluated case and writes the evaluation report at the end of the run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from .case_metrics import evaluate_case
from .reliability import add_case_bins
from .report import write_report

logger = logging.getLogger(__name__)


class CaseReportHandler:
    """Collect per-case, per-region metrics from ``CalSAMEvaluator`` outputs and write the report on completion.

    Args:
        output_dir: folder for ``per_case.csv``, ``summary.json``, ``report.md`` and the reliability diagrams.
        region_names: names of the ``K`` region channels, in channel order.
        n_bins: equal-width calibration bins.
        box_margin: dilation of the prompt boxes for the headline ECE voxel set, in voxels ``(H, W, D)``.
        settings: free settings recorded in ``summary.json`` (checkpoint, temperature, split, ...).
        tracking_uri: MLflow tracking URI; ``None`` disables MLflow logging.
        artifact_location: MLflow artifact folder URI for a newly created experiment.
        experiment_name: MLflow experiment.
        run_name: MLflow run name.
        headline_domains: domains whose means are logged at INFO level when the report is written.
    """

    def __init__(
        self,
        output_dir: str,
        region_names: list[str],
        n_bins: int = 15,
        box_margin: tuple[int, int, int] = (5, 5, 1),
        settings: dict | None = None,
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        experiment_name: str = "calsam",
        run_name: str = "evaluate",
        headline_domains: list[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.region_names = tuple(region_names)
        self.n_bins = int(n_bins)
        self.box_margin = tuple(int(m) for m in box_margin)
        self.settings = dict(settings or {})
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.headline_domains = headline_domains
        self.rows: list[dict] = []
        self.bin_stats: dict = {}
        self.summary: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Score cases on every iteration and write the report when the run completes."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score_case)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []
        self.bin_stats = {}

    def _score_case(self, engine: Engine) -> None:
        output = engine.state.output
        rows, bins = evaluate_case(
            output["pred"][0],
            output["label"][0].bool(),
            output["box_mask"][0],
            output["brain_mask"][0],
            output["spacing"],
            n_bins=self.n_bins,
            box_margin=self.box_margin,
            region_names=self.region_names,
        )
        domain = str(output["domain"])
        for row in rows:
            self.rows.append({"case_id": output["case_id"], "domain": domain, **row})
        add_case_bins(self.bin_stats, bins, domain=domain, region_names=self.region_names)

    def _write(self, engine: Engine) -> None:
        run = None
        # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, which MONAI's MLFlowHandler and
        # every child process would then follow. The previous value is restored once the report is logged.
        previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if self.tracking_uri:
            run = self._start_mlflow_run()
        try:
            self.summary = write_report(
                self.rows,
                self.bin_stats,
                str(self.output_dir),
                settings=self.settings,
                mlflow_run=run,
                box_margin=self.box_margin,
            )
        finally:
            if run is not None:
                import mlflow

                mlflow.end_run()
                if previous_uri is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous_uri
        self._log_headline()

    def _start_mlflow_run(self):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(self.experiment_name) is None:
            mlflow.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        mlflow.set_experiment(self.experiment_name)
        run = mlflow.start_run(run_name=self.run_name)
        flat = {key: str(value)[:500] for key, value in self.settings.items()}
        mlflow.log_params(flat)
        return run

    def _log_headline(self) -> None:
        if not self.summary:
            return
        domains = self.summary.get("metrics", {})
        for domain in self.headline_domains or sorted(domains):
            for region, metrics in domains.get(domain, {}).items():
                logger.info(
                    "%s %s: Dice %.3f (prompt box filled: %.3f), HD95 %.2f mm, ECE(box) %.4f over %s cases.",
                    domain,
                    region,
                    _mean(metrics, "dice"),
                    _mean(metrics, "dice_box_fill"),
                    _mean(metrics, "hd95_mm"),
                    _mean(metrics, "ece_box"),
                    metrics.get("dice", {}).get("count"),
                )
        logger.info("Evaluation summary written to %s", (self.output_dir / "summary.json").resolve())


def _mean(metrics: dict, name: str) -> float:
    value = metrics.get(name, {}).get("mean")
    return float("nan") if value is None else float(value)
