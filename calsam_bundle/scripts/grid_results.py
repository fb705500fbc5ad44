"""Collect the per-case results of a benchmark grid and reduce them to the report's tables.

Every table reduces in the same order. A case's value is the mean over its region channels (TC, WT, ET on
BraTS-coded data, NaN values left out). A run's value is the mean over the cases of a domain group. The table
shows the mean and sample std over seeds of the run values. Groups: ``source`` (held-out cases of the source
domains), ``target`` (clean cases of the other domains) and ``corrupted`` (domains named by
``corrupted_evaluation.corrupted_domain``). Wilcoxon tests pair cases, each averaged over seeds first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from .corrupted_evaluation import CASE_SEPARATOR, parse_corrupted_domain
from .grid import GridRun, plan_runs
from .grid_config import GridConfig
from .grid_statistics import PairedTest, domain_gap, gap_reduction, mean_std, paired_wilcoxon, relative_change

logger = logging.getLogger(__name__)

# Report metric: (per_case.csv column, title, unit, scale to the unit, higher is better).
METRICS: dict[str, tuple[str, str, str, float, bool]] = {
    "dice": ("dice", "Dice", "%", 100.0, True),
    "hd95": ("hd95_mm", "HD95", "mm", 1.0, False),
    "ece": ("ece_box", "ECE (box)", "%", 100.0, False),
    "ece_brain": ("ece_brain", "ECE (brain)", "%", 100.0, False),
    "ece_volume": ("ece_volume", "ECE (volume)", "%", 100.0, False),
}
HEADLINE_METRICS = ("dice", "hd95", "ece")
TEST_METRICS = ("dice", "ece")
GROUPS = ("source", "target")

__all__ = ["GROUPS", "HEADLINE_METRICS", "METRICS", "TEST_METRICS", "GridResults", "collect_results"]


def _run_case_values(run: GridRun, source_domains: list[str]) -> pd.DataFrame:
    """Return one row per case of one run: region means of every metric, in report units, with group columns."""
    rows = pd.read_csv(run.folder / "eval" / "evaluation" / "per_case.csv")
    columns = [column for column, *_ in METRICS.values() if column in rows.columns]
    cases = rows.groupby(["case_id", "domain"], as_index=False)[columns].mean()
    for name, (column, _, _, scale, _) in METRICS.items():
        cases[name] = cases[column] * scale if column in cases.columns else float("nan")
    parsed = [parse_corrupted_domain(domain) for domain in cases["domain"]]
    cases["corruption"] = [None if p is None else p[1] for p in parsed]
    cases["severity"] = [0 if p is None else p[2] for p in parsed]
    cases["source_case"] = [str(case_id).split(CASE_SEPARATOR)[0] for case_id in cases["case_id"]]
    groups = []
    for corrupted, domain in zip(parsed, cases["domain"]):
        if corrupted is not None:
            groups.append("corrupted")
        elif domain in source_domains:
            groups.append("source")
        else:
            groups.append("target")
    cases["group"] = groups
    cases["method"] = run.method.name
    cases["seed"] = run.seed
    return cases[["method", "seed", "case_id", "domain", "group", "corruption", "severity", "source_case", *METRICS]]


class GridResults:
    """Case values of every finished run and the tables built from them.

    Args:
        grid: the grid whose runs are read.
        cases: one row per (method, seed, case) as built by ``collect_results``.
        missing: names of runs without a ``per_case.csv``.
    """

    def __init__(self, grid: GridConfig, cases: pd.DataFrame, missing: list[str]) -> None:
        self.grid = grid
        self.cases = cases
        self.missing = missing
        self.methods = [name for name in grid.methods if name in set(cases["method"])]

    def run_means(self) -> pd.DataFrame:
        """Return the mean over cases per (method, seed, group) for the clean groups."""
        clean = self.cases[self.cases["group"].isin(GROUPS)]
        return clean.groupby(["method", "seed", "group"], as_index=False)[list(METRICS)].mean()

    def summary(self) -> pd.DataFrame:
        """Return mean, std and seed count per (method, group, metric), with the relative change vs the baseline."""
        means = self.run_means()
        records = []
        for (method, group), frame in means.groupby(["method", "group"]):
            for metric in METRICS:
                mean, std, count = mean_std(frame[metric].tolist())
                records.append(
                    {"method": method, "group": group, "metric": metric, "mean": mean, "std": std, "n_seeds": count}
                )
        table = pd.DataFrame.from_records(records)
        baseline = table[table["method"] == self.grid.baseline].set_index(["group", "metric"])["mean"]
        table["relative_change"] = [
            relative_change(row.mean, baseline.get((row.group, row.metric), float("nan"))) for row in table.itertuples()
        ]
        return table

    def gaps(self, summary: pd.DataFrame) -> pd.DataFrame:
        """Return the source-to-target gap of Dice and ECE per method and its reduction against the baseline."""
        means = summary.set_index(["method", "group", "metric"])["mean"]
        records = []
        for metric in TEST_METRICS:
            higher_is_better = METRICS[metric][4]
            baseline_gap = domain_gap(
                means.get((self.grid.baseline, "source", metric), float("nan")),
                means.get((self.grid.baseline, "target", metric), float("nan")),
                higher_is_better,
            )
            for method in self.methods:
                gap = domain_gap(
                    means.get((method, "source", metric), float("nan")),
                    means.get((method, "target", metric), float("nan")),
                    higher_is_better,
                )
                records.append(
                    {"method": method, "metric": metric, "gap": gap, "reduction": gap_reduction(gap, baseline_gap)}
                )
        return pd.DataFrame.from_records(records)

    def case_means_over_seeds(self, method: str, group: str, metric: str) -> pd.Series:
        """Return one value per case of a clean group: the metric averaged over the method's seeds."""
        frame = self.cases[(self.cases["method"] == method) & (self.cases["group"] == group)]
        return frame.groupby("case_id")[metric].mean()

    def wilcoxon(self) -> pd.DataFrame:
        """Return paired two-sided Wilcoxon tests over cases for every configured comparison, group and metric."""
        records = []
        for first, second in self.grid.report["comparisons"]:
            if first not in self.methods or second not in self.methods:
                continue
            for group in ("target", "source"):
                for metric in TEST_METRICS:
                    a = self.case_means_over_seeds(first, group, metric)
                    b = self.case_means_over_seeds(second, group, metric)
                    shared = a.index.intersection(b.index)
                    test = paired_wilcoxon(a[shared].tolist(), b[shared].tolist())
                    records.append({"a": first, "b": second, "group": group, "metric": metric, **vars(test)})
        columns = ["a", "b", "group", "metric", *PairedTest.__dataclass_fields__]
        return pd.DataFrame.from_records(records, columns=columns)

    def curves(self) -> pd.DataFrame:
        """Return mean and std over seeds per (method, corruption, severity); severity 0 is the clean target.

        Severity 0 uses only the clean target cases that were corrupted, so every point covers the same cases.
        """
        corrupted = self.cases[self.cases["group"] == "corrupted"]
        if corrupted.empty:
            return pd.DataFrame(columns=["method", "corruption", "severity", "metric", "mean", "std", "n_seeds"])
        sources = set(corrupted["source_case"])
        clean = self.cases[(self.cases["group"] == "target") & self.cases["case_id"].isin(sources)]
        frames = [corrupted]
        for corruption in sorted(corrupted["corruption"].unique()):
            frames.append(clean.assign(corruption=corruption, severity=0))
        combined = pd.concat(frames, ignore_index=True)
        per_seed = combined.groupby(["method", "seed", "corruption", "severity"], as_index=False)[list(METRICS)].mean()
        records = []
        for (method, corruption, severity), frame in per_seed.groupby(["method", "corruption", "severity"]):
            for metric in TEST_METRICS:
                mean, std, count = mean_std(frame[metric].tolist())
                records.append(
                    {
                        "method": method,
                        "corruption": corruption,
                        "severity": int(severity),
                        "metric": metric,
                        "mean": mean,
                        "std": std,
                        "n_seeds": count,
                    }
                )
        return pd.DataFrame.from_records(records)

    def step_records(self) -> pd.DataFrame:
        """Return one row per finished step (``trained.json``, ``done.json``): method, seed, step, wall and CPU s."""
        records = []
        for run in plan_runs(self.grid):
            for step, marker in (("train", run.folder / "trained.json"), ("evaluate", run.folder / "done.json")):
                if marker.is_file():
                    content = json.loads(marker.read_text())
                    records.append(
                        {
                            "method": run.method.name,
                            "seed": run.seed,
                            "step": step,
                            "wall_s": content.get("wall_s", float("nan")),
                            "cpu_s": content.get("cpu_s", float("nan")),
                        }
                    )
        return pd.DataFrame.from_records(records, columns=["method", "seed", "step", "wall_s", "cpu_s"])

    def training_times(self) -> pd.DataFrame:
        """Return mean and std over seeds of the training wall and CPU time per trained method."""
        steps = self.step_records()
        steps = steps[steps["step"] == "train"]
        records = []
        for method in self.methods:
            frame = steps[steps["method"] == method]
            if frame.empty:
                continue
            wall_mean, wall_std, count = mean_std(frame["wall_s"].tolist())
            cpu_mean, cpu_std, _ = mean_std(frame["cpu_s"].tolist())
            records.append(
                {
                    "method": method,
                    "mean_s": wall_mean,
                    "std_s": wall_std,
                    "cpu_mean_s": cpu_mean,
                    "cpu_std_s": cpu_std,
                    "n_seeds": count,
                }
            )
        columns = ["method", "mean_s", "std_s", "cpu_mean_s", "cpu_std_s", "n_seeds"]
        table = pd.DataFrame.from_records(records, columns=columns)
        baseline = table.set_index("method")["cpu_mean_s"].get(self.grid.baseline, float("nan"))
        table["relative_change"] = [relative_change(value, baseline) for value in table["cpu_mean_s"]]
        return table


def collect_results(grid: GridConfig) -> GridResults:
    """Read ``per_case.csv`` of every finished run of the grid; runs without one are listed in ``missing``."""
    frames, missing = [], []
    for run in plan_runs(grid):
        folder = run.folder / "eval" / "evaluation"
        if not (folder / "per_case.csv").is_file():
            missing.append(run.name)
            continue
        summary = json.loads((folder / "summary.json").read_text())
        source_domains = [str(domain) for domain in summary["settings"].get("source_domains") or []]
        frames.append(_run_case_values(run, source_domains))
    if not frames:
        raise FileNotFoundError(
            f"No run of grid {str(grid.path)!r} has evaluation results under {str(grid.output_dir)!r} "
            f"(checked {len(missing)} runs for eval/evaluation/per_case.csv); run the grid without --report-only, "
            "or read the train.log and evaluate.log of the failed runs in runs/<method>/seed<N>/."
        )
    if missing:
        logger.warning("No evaluation results for %d runs: %s", len(missing), ", ".join(missing))
    return GridResults(grid, pd.concat(frames, ignore_index=True), missing)


def read_json(path: Path) -> dict:
    """Return the JSON content of ``path``, or an empty dict when the file is missing."""
    return json.loads(path.read_text()) if path.is_file() else {}
