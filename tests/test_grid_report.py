"""Grid statistics on hand-made cases, and the grid report on synthetic per-case CSVs written in tmp_path."""

import csv
import json
import math
import sqlite3

import pytest
import yaml

from scripts.corrupted_evaluation import corrupted_domain, corrupted_test_items, parse_corrupted_domain
from scripts.grid import plan_runs, run_overrides
from scripts.grid_config import load_grid
from scripts.grid_report import write_grid_report
from scripts.grid_results import collect_results
from scripts.grid_statistics import domain_gap, gap_reduction, mean_std, paired_wilcoxon, relative_change

BUNDLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "calsam_bundle"


def test_wilcoxon_all_positive_exact():
    test = paired_wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.2, 2.1, 2.7, 3.5])
    # Differences 0.5, 0.8, 0.9, 1.3, 1.5: all positive, so W- = 0 and the exact two-sided p is 2 / 2**5.
    assert test.method == "exact"
    assert test.p_value == pytest.approx(2 / 32)
    assert test.statistic == 0
    assert test.n_pairs == 5
    assert test.mean_difference == pytest.approx(1.0)


def test_wilcoxon_exact_mixed_signs():
    # Differences +1, -2, +3, +4, +5, +6: W- = 2. Subsets of ranks 1..6 with sum <= 2: {}, {1}, {2}: 3 of 64.
    test = paired_wilcoxon([1.0, -2.0, 3.0, 4.0, 5.0, 6.0], [0.0] * 6)
    assert test.method == "exact"
    assert test.statistic == 2
    assert test.p_value == pytest.approx(2 * 3 / 64)


def test_wilcoxon_zeros_use_permutation():
    test = paired_wilcoxon([1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    # The zero is dropped (wilcox), leaving 3 positive differences: the permutation test gives 2 / 2**3.
    assert test.method == "permutation"
    assert test.n_zero == 1
    assert test.p_value == pytest.approx(2 / 8)


def test_wilcoxon_large_sample_normal():
    first = [float(i) for i in range(60)]
    second = [value - 1.0 - 0.01 * i for i, value in enumerate(first)]
    test = paired_wilcoxon(first, second)
    assert test.method == "normal approximation"
    assert test.p_value < 1e-6


def test_wilcoxon_all_zero_and_nan():
    test = paired_wilcoxon([1.0, 2.0, math.nan], [1.0, 2.0, 5.0])
    assert test.n_pairs == 2
    assert test.method == "none"
    assert test.p_value == 1.0


def test_mean_std_known_values():
    mean, std, count = mean_std([2.0, 4.0, 6.0, math.nan])
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(2.0)
    assert count == 3


def test_gap_reduction_by_hand():
    # Baseline: source Dice 80, target 70 -> gap 10; method: 82 and 76 -> gap 6, so 40 % smaller.
    baseline_gap = domain_gap(80.0, 70.0, higher_is_better=True)
    gap = domain_gap(82.0, 76.0, higher_is_better=True)
    assert baseline_gap == pytest.approx(10.0)
    assert gap_reduction(gap, baseline_gap) == pytest.approx(0.4)
    # ECE: target - source. Baseline 5 -> 9 (gap 4), method 4 -> 5 (gap 1): 75 % smaller.
    assert gap_reduction(domain_gap(4.0, 5.0, False), domain_gap(5.0, 9.0, False)) == pytest.approx(0.75)
    assert math.isnan(gap_reduction(1.0, 0.0))
    assert relative_change(5.2, 8.0) == pytest.approx(-0.35)


def test_corrupted_domain_round_trip():
    domain = corrupted_domain("scanner_b", "bias_field", 3)
    assert domain == "scanner_b:bias_field:3"
    assert parse_corrupted_domain(domain) == ("scanner_b", "bias_field", 3)
    assert parse_corrupted_domain("scanner_b") is None


def test_no_corruptions_no_items(tmp_path):
    assert corrupted_test_items([{"case_id": "a", "domain": "x"}], str(tmp_path), corruptions=[]) == []


# Hand-made per-case values. Target Dice per (method, seed): the mean over the cases of the region means.
CASES = {"source": ["s0", "s1"], "target": ["t0", "t1", "t2", "t3", "t4"]}


def _dice(method: str, seed: int, group: str, index: int) -> float:
    base = 0.8 if group == "source" else 0.6
    bonus = {"baseline": 0.0, "calsam": 0.1}[method]
    return base + bonus * (group == "target") + 0.01 * seed + 0.02 * index


def _ece(method: str, seed: int, group: str, index: int) -> float:
    base = 0.05 if group == "source" else 0.10
    factor = {"baseline": 1.0, "calsam": 0.5}[method]
    return base * (factor if group == "target" else 1.0) + 0.001 * index


def _write_grid(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    content = {
        "output_dir": str(tmp_path / "grid"),
        "experiment_name": "test-grid",
        "seeds": [0, 1],
        "train_configs": ["configs/train.yaml"],
        "evaluate_configs": ["configs/train.yaml", "configs/evaluate.yaml"],
        "methods": {
            "baseline": {"label": "Baseline", "overrides": {"fip#enabled": False}},
            "calsam": {"label": "CalSAM"},
            "temperature": {"label": "TS", "model_from": "baseline", "evaluate_overrides": {"apply_temperature": True}},
        },
        "report": {
            "baseline": "baseline",
            "proposed": "calsam",
            "comparisons": [["calsam", "baseline"]],
            "reference": {"claims": {"ece_reduction_percent": [27, 39], "gap_reduction_percent": [20, 40]}},
        },
    }
    grid_file.write_text(yaml.safe_dump(content))
    grid = load_grid(grid_file, BUNDLE)
    for run in plan_runs(grid):
        if run.method.name == "temperature":
            continue
        folder = run.folder / "eval" / "evaluation"
        folder.mkdir(parents=True)
        rows = []
        for group, case_ids in CASES.items():
            domain = "scanner_a" if group == "source" else "scanner_b"
            for index, case_id in enumerate(case_ids):
                dice = _dice(run.method.name, run.seed, group, index)
                ece = _ece(run.method.name, run.seed, group, index)
                # Two regions whose mean is the hand value; ECE of the second region is NaN (empty box set).
                rows.append({"case_id": case_id, "domain": domain, "region": "TC", "dice": dice - 0.05, "ece_box": ece})
                rows.append({"case_id": case_id, "domain": domain, "region": "WT", "dice": dice + 0.05, "ece_box": ""})
        with open(folder / "per_case.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["case_id", "domain", "region", "dice", "ece_box"])
            writer.writeheader()
            writer.writerows(rows)
        (folder / "summary.json").write_text(json.dumps({"settings": {"source_domains": ["scanner_a"]}}))
        (run.folder / "trained.json").write_text(json.dumps({"wall_s": 100.0 + 10 * run.seed}))
    return grid


def test_summary_means_and_stds(tmp_path):
    grid = _write_grid(tmp_path)
    results = collect_results(grid)
    assert results.missing == ["temperature-seed0", "temperature-seed1"]
    summary = results.summary().set_index(["method", "group", "metric"])
    # Baseline target Dice per seed: mean of 0.6 + 0.02 i over i = 0..4, plus 0.01 seed -> 64 % and 65 %.
    assert summary.loc[("baseline", "target", "dice"), "mean"] == pytest.approx(64.5)
    assert summary.loc[("baseline", "target", "dice"), "std"] == pytest.approx(math.sqrt(0.5))
    assert summary.loc[("calsam", "target", "dice"), "mean"] == pytest.approx(74.5)
    # Target ECE: baseline 10.2 %, CalSAM 5.2 %, the same for both seeds.
    assert summary.loc[("baseline", "target", "ece"), "mean"] == pytest.approx(10.2)
    assert summary.loc[("calsam", "target", "ece"), "relative_change"] == pytest.approx(5.2 / 10.2 - 1)


def test_gaps_and_wilcoxon_on_synthetic_runs(tmp_path):
    grid = _write_grid(tmp_path)
    results = collect_results(grid)
    summary = results.summary()
    gaps = results.gaps(summary).set_index(["method", "metric"])
    # Source Dice 81.5 % for both; target 64.5 % and 74.5 %: gaps 17 and 7 pp.
    assert gaps.loc[("baseline", "dice"), "gap"] == pytest.approx(17.0)
    assert gaps.loc[("calsam", "dice"), "reduction"] == pytest.approx(1 - 7 / 17)
    tests = results.wilcoxon().set_index(["group", "metric"])
    # CalSAM is 10 pp better in Dice on each of the 5 target cases: tied differences, so permutation, p = 2 / 32.
    assert tests.loc[("target", "dice"), "p_value"] == pytest.approx(2 / 32)
    assert tests.loc[("target", "dice"), "method"] == "permutation"
    assert tests.loc[("source", "dice"), "method"] == "none"


def test_report_files_and_mlflow(tmp_path):
    grid = _write_grid(tmp_path)
    from scripts.grid import ensure_experiment

    ensure_experiment(grid)
    paths = write_grid_report(grid)
    markdown = paths["results_md"].read_text()
    assert "| CalSAM | 81.5 ± 0.7 |" in markdown
    assert (
        "not reproduced: smaller than the published range"
        not in markdown.split("ECE (box) reduction vs baseline, target")[1].split("\n")[0]
    )
    assert "larger than the published range" in markdown
    assert paths["results_csv"].is_file()
    with sqlite3.connect(grid.output_dir / "mlruns.db") as database:
        names = {row[0] for row in database.execute("SELECT name FROM runs")}
        keys = {row[0] for row in database.execute("SELECT key FROM metrics")}
    assert "grid-report" in names
    assert "calsam/target/dice_mean" in keys


def test_overrides_share_split_and_cache(tmp_path):
    grid = _write_grid(tmp_path)
    runs = {run.name: run for run in plan_runs(grid)}
    train = run_overrides(grid, runs["calsam-seed1"], "train")
    assert train["seed"] == 1
    assert train["split_seed"] == 0
    assert train["network_seed"] == 0
    assert train["embedding_cache_dir"] == str(grid.output_dir / "cache" / "embeddings")
    assert train["mlflow#experiment_name"] == "test-grid"
    evaluate = run_overrides(grid, runs["temperature-seed1"], "evaluate")
    assert evaluate["apply_temperature"] is True
    assert evaluate["ckpt_dir"] == str(grid.output_dir / "runs" / "baseline" / "seed1" / "models")
    assert evaluate["evaluation_run_name"] == "evaluate-temperature-seed1"
    assert list(runs).index("temperature-seed0") > list(runs).index("baseline-seed0")


def test_grid_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seeds": [0], "methods": {"a": {"model_from": "missing"}}}))
    with pytest.raises(ValueError, match="model_from 'missing'"):
        load_grid(bad, BUNDLE)


def test_runner_end_to_end(tmp_path):
    """Train one method and evaluate it plus a model_from method through monai.bundle; a re-run skips both."""
    from synthetic_cases import write_cases

    from scripts.grid import main

    datalist = write_cases(tmp_path / "data", count=8)
    grid_file = tmp_path / "tiny_grid.yaml"
    content = {
        "output_dir": str(tmp_path / "grid"),
        "experiment_name": "tiny-grid",
        "seeds": [0],
        "train_configs": ["configs/train.yaml"],
        "evaluate_configs": ["configs/train.yaml", "configs/evaluate.yaml"],
        "overrides": {
            "datalist": datalist,
            "source_domains": ["scanner_a"],
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "device": "$torch.device('cpu')",
            "sam_variant": "small",
            "sam_image_size": 256,
            "sam_checkpoint": None,
            "max_epochs": 1,
            "loss": {"_target_": "scripts.calibration_losses.MarginLabelSmoothingLoss"},
        },
        "methods": {
            "mbls": {"label": "MbLS", "overrides": {"fip#enabled": False, "cmp#enabled": False}},
            "temperature": {"label": "TS", "model_from": "mbls", "evaluate_overrides": {"apply_temperature": True}},
        },
        "report": {"baseline": "mbls", "proposed": "temperature", "comparisons": [["temperature", "mbls"]]},
    }
    grid_file.write_text(yaml.safe_dump(content))

    assert main(["--grid", str(grid_file), "--threads", "1"]) == 0
    grid = load_grid(grid_file, BUNDLE)
    runs = {run.name: run for run in plan_runs(grid)}
    trained = runs["mbls-seed0"].folder / "trained.json"
    done = runs["temperature-seed0"].folder / "done.json"
    assert trained.is_file()
    assert done.is_file()
    summary = json.loads((runs["temperature-seed0"].folder / "eval" / "evaluation" / "summary.json").read_text())
    assert summary["settings"]["temperature"] is not None
    assert "| MbLS |" in (grid.output_dir / "results.md").read_text()
    with sqlite3.connect(grid.output_dir / "mlruns.db") as database:
        names = {row[0] for row in database.execute("SELECT name FROM runs")}
    assert {"train-mbls-seed0", "evaluate-mbls-seed0", "evaluate-temperature-seed0", "grid-report"} <= names

    stamps = (trained.stat().st_mtime_ns, done.stat().st_mtime_ns)
    assert main(["--grid", str(grid_file), "--threads", "1"]) == 0
    assert (trained.stat().st_mtime_ns, done.stat().st_mtime_ns) == stamps
