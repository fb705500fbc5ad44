"""Markdown page of a benchmark grid's results: every number comes from the tables of ``grid_results``."""

from __future__ import annotations

import math

import pandas as pd

from .grid_config import GridConfig
from .grid_results import GROUPS, HEADLINE_METRICS, METRICS, GridResults
from .voxel_sets import VOXEL_SET_DEFINITIONS

__all__ = ["claim_rows", "results_markdown"]

DECIMALS = {"dice": 1, "hd95": 2, "ece": 2, "ece_brain": 3, "ece_volume": 3}
SIGNIFICANCE = 0.01


def _number(value: float, decimals: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:+.1f} %"


def _p_value(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3g}"


def _cell(summary: pd.DataFrame, method: str, group: str, metric: str) -> str:
    rows = summary[(summary["method"] == method) & (summary["group"] == group) & (summary["metric"] == metric)]
    if rows.empty:
        return "n/a"
    row = rows.iloc[0]
    decimals = DECIMALS[metric]
    if not math.isfinite(row["std"]):
        return _number(row["mean"], decimals)
    return f"{_number(row['mean'], decimals)} ± {_number(row['std'], decimals)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _range_reading(value: float, low: float, high: float) -> str:
    """Compare a measured reduction (a fraction) with a published range in percent."""
    if not math.isfinite(value):
        return "not measurable: a result is missing or the baseline has no gap to reduce"
    percent = 100 * value
    if low <= percent <= high:
        return "reproduced: within the published range"
    if percent > high:
        return "reproduced in direction: larger than the published range"
    if percent > 0:
        return "not reproduced: smaller than the published range"
    return "not reproduced: no reduction"


def claim_rows(grid: GridConfig, summary: pd.DataFrame, gaps: pd.DataFrame, tests: pd.DataFrame) -> list[list[str]]:
    """Return the rows of the claims table: published value, measured value and the reading."""
    claims = grid.report.get("reference", {}).get("claims", {})
    proposed, baseline = grid.proposed, grid.baseline
    means = summary.set_index(["method", "group", "metric"])["mean"]
    rows = []
    if "ece_reduction_percent" in claims:
        low, high = claims["ece_reduction_percent"]
        for group in GROUPS:
            base = means.get((baseline, group, "ece"), math.nan)
            value = means.get((proposed, group, "ece"), math.nan)
            reduction = 1 - value / base if math.isfinite(base) and base > 0 else math.nan
            test = tests[
                (tests["a"] == proposed)
                & (tests["b"] == baseline)
                & (tests["group"] == group)
                & (tests["metric"] == "ece")
            ]
            p = _p_value(test["p_value"].iloc[0]) if not test.empty else "n/a"
            rows.append(
                [
                    f"ECE (box) reduction vs baseline, {group}",
                    f"{low}-{high} %",
                    f"{_percent(reduction)} (p = {p})",
                    _range_reading(reduction, low, high),
                ]
            )
    if "gap_reduction_percent" in claims:
        low, high = claims["gap_reduction_percent"]
        for metric in ("dice", "ece"):
            row = gaps[(gaps["method"] == proposed) & (gaps["metric"] == metric)]
            reduction = row["reduction"].iloc[0] if not row.empty else math.nan
            title = METRICS[metric][1]
            rows.append(
                [
                    f"{title} domain-gap reduction vs baseline",
                    f"{low}-{high} %",
                    _percent(reduction),
                    _range_reading(reduction, low, high),
                ]
            )
    singles = [pair[1] for pair in grid.report["comparisons"] if pair[0] == proposed and pair[1] != baseline]
    for metric in ("ece", "dice"):
        better_everywhere, details = True, []
        for single in singles:
            test = tests[
                (tests["a"] == proposed)
                & (tests["b"] == single)
                & (tests["group"] == "target")
                & (tests["metric"] == metric)
            ]
            if test.empty:
                better_everywhere = False
                continue
            difference, p = test["mean_difference"].iloc[0], test["p_value"].iloc[0]
            better = difference > 0 if METRICS[metric][4] else difference < 0
            better_everywhere &= bool(better and p < SIGNIFICANCE)
            details.append(f"vs {single}: {difference:+.2f} pp, p = {_p_value(p)}")
        if singles:
            reading = (
                "reproduced"
                if better_everywhere
                else f"not reproduced (needs better than each single penalty at p < {SIGNIFICANCE})"
            )
            rows.append(
                [f"FIP and CMP complementary, target {METRICS[metric][1]}", "p < 0.01", "; ".join(details), reading]
            )
    return rows


def results_markdown(
    grid: GridConfig,
    results: GridResults,
    summary: pd.DataFrame,
    gaps: pd.DataFrame,
    tests: pd.DataFrame,
    times: pd.DataFrame,
    run_info: dict,
    figures: list[str],
) -> str:
    """Return the Markdown page of the grid's results."""
    methods, labels = results.methods, {name: grid.methods[name].label for name in results.methods}
    seeds = ", ".join(str(seed) for seed in grid.seeds)
    n_runs = len(set(zip(results.cases["method"], results.cases["seed"])))
    lines = [
        f"# Benchmark grid results: `{grid.path.name}`",
        "",
        f"Written by `scripts/grid_report.py` from {n_runs} runs ({len(methods)} methods, seeds {seeds}). "
        f"Missing runs: {', '.join(results.missing) or 'none'}.",
    ]
    if run_info:
        lines.append(
            f"Grid run finished {run_info.get('finished')}, wall time {run_info.get('wall_s', math.nan) / 60:.1f} min, "
            f"{run_info.get('jobs')} runs at once with {run_info.get('threads_per_run')} torch threads each, "
            f"CPU {run_info.get('cpu_model')} ({run_info.get('cpu_count')} logical CPUs), "
            f"failed runs: {len(run_info.get('failed', {}))}. Code: git commit {run_info.get('commit') or 'unknown'}"
            f"{', with uncommitted changes' if run_info.get('uncommitted_changes') else ''}."
        )
    lines += [
        "",
        "Each cell is the mean ± sample std over seeds of the run means over cases. A case's value is the mean over "
        "its region channels. Source: held-out cases of the training domains. Target: clean cases of the other "
        "domains. ECE: equal-width bins (`ece_bins` of evaluate.yaml) over the `box` voxel set: "
        f"{VOXEL_SET_DEFINITIONS['box']}",
        "",
        "## Results",
        "",
    ]
    header = ["Method"] + [
        f"{group.capitalize()} {METRICS[m][1]} ({METRICS[m][2]})" for group in GROUPS for m in HEADLINE_METRICS
    ]
    rows = [
        [labels[m]] + [_cell(summary, m, g, metric) for g in GROUPS for metric in HEADLINE_METRICS] for m in methods
    ]
    lines += _table(header, rows)
    reference = grid.report.get("reference", {})
    if reference.get("rows"):
        lines += ["", f"Published numbers for comparison ({reference.get('source', 'reference')}):", ""]
        ref_rows = [
            [
                str(r.get("method")),
                str(r.get("target_dice", "")),
                str(r.get("target_hd95", "")),
                str(r.get("target_ece", "")),
            ]
            for r in reference["rows"]
        ]
        lines += _table(["Method", "Target Dice (%)", "Target HD95 (mm)", "Target ECE (%)"], ref_rows)

    lines += [
        "",
        "## Relative change against the baseline",
        "",
        f"`(method - baseline) / baseline` of the seed means; baseline: {labels.get(grid.baseline, grid.baseline)}.",
        "",
    ]
    rows = []
    for method in methods:
        cells = []
        for group in GROUPS:
            for metric in HEADLINE_METRICS:
                row = summary[
                    (summary["method"] == method) & (summary["group"] == group) & (summary["metric"] == metric)
                ]
                cells.append(_percent(row["relative_change"].iloc[0]) if not row.empty else "n/a")
        rows.append([labels[method], *cells])
    lines += _table(header, rows)

    lines += [
        "",
        "## Domain gap",
        "",
        "Gap: source - target Dice and target - source ECE, in percentage points, from the seed means. "
        "Reduction: `1 - gap(method) / gap(baseline)`.",
        "",
    ]
    rows = []
    for method in methods:
        cells = []
        for metric in ("dice", "ece"):
            row = gaps[(gaps["method"] == method) & (gaps["metric"] == metric)]
            cells += (
                [_number(row["gap"].iloc[0], 2), _percent(row["reduction"].iloc[0])]
                if not row.empty
                else ["n/a", "n/a"]
            )
        rows.append([labels[method], *cells])
    lines += _table(["Method", "Dice gap (pp)", "Dice gap reduction", "ECE gap (pp)", "ECE gap reduction"], rows)

    lines += ["", "## Published claims checked on this grid", ""]
    lines += _table(["Claim", "Published", "Measured", "Reading"], claim_rows(grid, summary, gaps, tests))

    lines += [
        "",
        "## Paired Wilcoxon signed-rank tests",
        "",
        "Two-sided tests over cases; each case's metric is averaged over seeds first, so pairs are cases, not runs. "
        "Zero differences are dropped before ranking (`zero_method='wilcox'`, counted in the zeros column). Method: "
        "`exact` null distribution for at most 50 pairs without ties or zeros, `permutation` over all sign flips for "
        "at most 13 pairs with ties or zeros, otherwise the normal approximation (scipy.stats.wilcoxon). "
        "Differences are A - B in percentage points.",
        "",
    ]
    rows = [
        [
            labels[r.a],
            labels[r.b],
            r.group,
            METRICS[r.metric][1],
            str(r.n_pairs),
            str(r.n_zero),
            _number(r.mean_difference, 2),
            _number(r.median_difference, 2),
            _p_value(r.p_value),
            r.method,
        ]
        for r in tests.itertuples()
    ]
    lines += _table(["A", "B", "Group", "Metric", "Pairs", "Zeros", "Mean diff", "Median diff", "p", "Method"], rows)

    lines += [
        "",
        "## Calibration over larger voxel sets",
        "",
        "ECE (%) over the brain mask and the whole volume, where background dominates.",
        "",
    ]
    extra = [(g, m) for g in GROUPS for m in ("ece_brain", "ece_volume")]
    rows = [[labels[m]] + [_cell(summary, m, g, metric) for g, metric in extra] for m in methods]
    lines += _table(["Method"] + [f"{g.capitalize()} {METRICS[m][1]}" for g, m in extra], rows)

    steps = results.step_records()
    lines += [
        "",
        "## Training time",
        "",
        "Mean ± std over seeds of each training subprocess, including start-up, data loading, embedding lookups, "
        "validation and the temperature fit. CPU time is user + system time of the process. Wall time depends on "
        "what else ran on the machine, so the comparison with the baseline uses CPU time.",
        "",
    ]
    rows = [
        [
            labels[r.method],
            f"{_number(r.mean_s, 0)} ± {_number(r.std_s, 0)}",
            f"{_number(r.cpu_mean_s, 0)} ± {_number(r.cpu_std_s, 0)}",
            _percent(r.relative_change),
        ]
        for r in times.itertuples()
    ]
    lines += _table(["Method", "Wall (s)", "CPU (s)", "CPU vs baseline"], rows)
    lines += [
        "",
        f"All {len(steps)} finished steps together: {steps['cpu_s'].sum() / 60:.1f} min CPU time and "
        f"{steps['wall_s'].sum() / 60:.1f} min of subprocess wall time (summed over steps that ran in parallel).",
    ]

    if figures:
        corruptions = grid.corruptions
        lines += [
            "",
            "## Corruption curves",
            "",
            f"Target cases: the first {corruptions['max_cases'] or 'all'} in case_id order. Severities "
            f"{corruptions['severities']}, corruption seed {corruptions['seed']}. Severity 0 is the clean version of "
            "the same cases.",
            "",
        ]
        lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
