"""Per-case evaluation, Ignite handlers and the report writer with a real MLflow SQLite store."""

import copy
import csv
import json
import math

import matplotlib.image
import mlflow
import pytest
import torch
from ignite.engine import Engine

from scripts.case_metrics import CalibrationMetrics, SurfaceDistanceMetric, evaluate_case, metric_columns
from scripts.metric_handlers import BoxCalibrationError, HausdorffDistance95
from scripts.reliability import add_case_bins
from scripts.report import write_report

K, H, W, D = 3, 24, 24, 10
REGIONS = ("TC", "WT", "ET")
SPACING = (1.0, 1.0, 2.0)


def _case(seed, prompt_et=True):
    generator = torch.Generator().manual_seed(seed)
    prob = torch.rand((K, H, W, D), generator=generator) ** 2
    label = torch.rand((K, H, W, D), generator=generator) < prob
    box = torch.zeros((K, H, W, D), dtype=torch.bool)
    box[:, 4:12, 4:12, 3:6] = True
    if not prompt_et:
        box[2] = False  # no ET prompt: the ET box set is empty and its box metrics are NaN
    brain = torch.ones((H, W, D), dtype=torch.bool)
    return {"pred": prob, "label": label, "box_mask": box, "brain_mask": brain}


def _evaluate(cases):
    rows, pooled = [], {}
    for case_id, (domain, case) in enumerate(cases):
        case_rows, bins = evaluate_case(case["pred"], case["label"], case["box_mask"], case["brain_mask"], SPACING)
        for row in case_rows:
            row.update(case_id=f"case{case_id}", domain=domain)
        rows += case_rows
        add_case_bins(pooled, bins, domain=domain, region_names=REGIONS)
    return rows, pooled


@pytest.fixture(scope="module")
def evaluated_once():
    cases = [("siemens", _case(0, prompt_et=False)), ("siemens", _case(1)), ("ge", _case(2)), ("ge", _case(3))]
    return _evaluate(cases)


@pytest.fixture
def evaluated(evaluated_once):
    """Copies of the module's rows and pooled bins, so a test may change them."""
    rows, pooled = evaluated_once
    return copy.deepcopy(rows), copy.deepcopy(pooled)


@pytest.fixture(scope="module")
def report(tmp_path_factory, evaluated_once):
    """One report written for the tests that only read it: (folder, returned summary)."""
    folder = tmp_path_factory.mktemp("report")
    rows, pooled = copy.deepcopy(evaluated_once)
    summary = write_report(rows, pooled, folder, settings={"box_margin": [5, 5, 1], "data": "synthetic"})
    return folder, summary


@pytest.fixture(scope="module")
def mlflow_experiment(tmp_path_factory):
    """An MLflow SQLite store and experiment whose artifacts stay in a temporary folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlruns.db")
    experiment_id = mlflow.create_experiment("report-test", artifact_location=(folder / "artifacts").as_uri())
    yield experiment_id
    mlflow.set_tracking_uri(None)


def test_evaluate_case_rows(evaluated):
    rows, _ = evaluated
    assert len(rows) == 4 * K
    assert set(metric_columns()) <= set(rows[0])
    assert rows[0]["region"] == "TC"
    assert math.isnan(rows[2]["ece_box"])  # case 0, ET: no prompt
    assert rows[2]["n_voxels_box"] == 0
    assert rows[0]["n_voxels_volume"] == H * W * D


def test_evaluate_case_box_count(evaluated):
    rows, _ = evaluated
    # An 8 x 8 box on slices 3..5, dilated by (5, 5, 1): 18 x 18 in-plane (rows -1..16 clipped to 0..16 =
    # 17 rows and columns), slices 2..6.
    assert rows[0]["n_voxels_box"] == 17 * 17 * 5


def test_report_files(report):
    folder, _ = report
    for name in ("per_case.csv", "summary.json", "report.md"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*.tmp"))


def test_csv_row_per_case_region(report):
    folder, _ = report
    with open(folder / "per_case.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 * K
    assert {(row["case_id"], row["region"]) for row in table} == {(f"case{i}", r) for i in range(4) for r in REGIONS}
    assert "ece_box" in table[0]


def test_summary_counts_exclude_nan(report):
    folder, summary = report
    on_disk = json.loads((folder / "summary.json").read_text())
    et = on_disk["metrics"]["siemens"]["ET"]["ece_box"]
    assert et["count"] == 1
    assert et["n_nan"] == 1
    assert et["std"] is None  # a single value has no sample standard deviation
    assert on_disk["metrics"]["siemens"]["TC"]["ece_box"]["count"] == 2
    assert summary["n_bins"] == 15
    assert summary["box_margin"] == [5, 5, 1]
    assert set(summary["voxel_sets"]) == {"box", "foreground", "union", "brain", "volume"}


def test_summary_mean_matches_rows(report, evaluated):
    rows, _ = evaluated
    _, summary = report
    dice_values = [row["dice"] for row in rows if row["domain"] == "ge" and row["region"] == "WT"]
    assert summary["metrics"]["ge"]["WT"]["dice"]["mean"] == pytest.approx(sum(dice_values) / 2, abs=1e-12)


def test_pooled_ece_weighs_voxels(report, evaluated):
    _, pooled = evaluated
    _, summary = report
    bins = pooled[("ge", "TC", "box")]
    expected = abs(bins["conf_sum"] - bins["correct_sum"]).sum() / bins["count"].sum()
    assert summary["pooled_calibration"]["ge"]["TC"]["box"]["ece"] == pytest.approx(float(expected), abs=1e-12)


def test_reliability_diagrams_are_png(report):
    folder, _ = report
    diagrams = sorted(folder.glob("reliability_*.png"))
    assert len(diagrams) == 2 * K
    for path in diagrams:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3
        assert image.shape[0] > 100


def test_markdown_table(report):
    folder, _ = report
    text = (folder / "report.md").read_text()
    assert "| Domain | Region | Cases | Dice | Dice, box fill | HD95 (mm) | ECE (box) |" in text
    assert text.count("| siemens |") == K
    assert "±" in text


def _one_domain(pooled, domain="ge"):
    """Bins of one domain only, which halves the diagrams to draw."""
    return {key: bins for key, bins in pooled.items() if key[0] == domain}


def test_mlflow_skips_nan(tmp_path, evaluated, mlflow_experiment):
    rows, pooled = evaluated
    pooled = _one_domain(pooled)
    for row in rows:
        if row["domain"] == "ge" and row["region"] == "ET":
            row["nll_box"] = math.nan  # every value NaN, so the mean is NaN and must not be logged
    with mlflow.start_run(experiment_id=mlflow_experiment) as run:
        write_report(rows, pooled, tmp_path, settings={"box_margin": [5, 5, 1]})
    client = mlflow.tracking.MlflowClient()
    logged = client.get_run(run.info.run_id).data.metrics
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "ge/ET/nll_box" not in logged
    assert logged["report/n_skipped_nonfinite"] == 1
    dice_values = [r["dice"] for r in rows if r["domain"] == "ge" and r["region"] == "TC"]
    assert logged["ge/TC/dice"] == pytest.approx(sum(dice_values) / 2)
    assert "evaluation/summary.json" in artifacts
    assert "evaluation/reliability_ge_TC.png" in artifacts


def test_mlflow_failure_does_not_raise(tmp_path, evaluated, mlflow_experiment, caplog):
    rows, pooled = evaluated
    pooled = _one_domain(pooled)
    summary = write_report(rows, pooled, tmp_path, settings={"box_margin": [5, 5, 1]}, mlflow_run="no-such-run")
    assert summary["n_bins"] == 15
    assert "MLflow logging" in caplog.text


def test_row_without_domain_raises(tmp_path, evaluated):
    rows, pooled = evaluated
    del rows[0]["domain"]
    with pytest.raises(ValueError, match="domain"):
        write_report(rows, pooled, tmp_path, settings={})


def _engine_outputs():
    outputs = []
    for seed in range(2):
        case = _case(seed)
        outputs.append(
            {
                "pred": case["pred"].unsqueeze(0),
                "label": case["label"].unsqueeze(0).float(),
                "box_mask": case["box_mask"].unsqueeze(0),
                "brain_mask": case["brain_mask"].unsqueeze(0),
                "spacing": torch.tensor(SPACING),
            }
        )
    return outputs


def test_handlers_on_bare_engine():
    outputs = _engine_outputs()
    engine = Engine(lambda engine, batch: batch)
    BoxCalibrationError().attach(engine, "box_ece")
    HausdorffDistance95().attach(engine, "hd95")
    engine.run(outputs)

    expected_ece = torch.stack(
        [CalibrationMetrics()(o["pred"], o["label"], box_mask=o["box_mask"])[0] for o in outputs]
    ).mean()
    expected_hd95 = torch.stack(
        [SurfaceDistanceMetric()(o["pred"], o["label"], spacing=o["spacing"])[0] for o in outputs]
    ).mean()
    assert engine.state.metrics["box_ece"] == pytest.approx(expected_ece.item(), abs=1e-12)
    assert engine.state.metrics["hd95"] == pytest.approx(expected_hd95.item(), abs=1e-12)
    assert engine.state.metric_details["box_ece"].shape == (2, K)


def test_handler_reads_masks_from_batch():
    outputs = _engine_outputs()

    def step(engine, batch):
        return {"pred": batch["pred"], "label": batch["label"]}

    engine = Engine(step)
    BoxCalibrationError(reduction="mean_batch").attach(engine, "box_ece")
    engine.run(outputs)
    assert len(engine.state.metrics["box_ece"]) == K


def test_handler_missing_key_raises():
    engine = Engine(lambda engine, batch: {"pred": batch["pred"], "label": batch["label"]})
    HausdorffDistance95().attach(engine, "hd95")
    with pytest.raises(KeyError, match="spacing"):
        engine.run([{"pred": torch.rand(1, K, H, W, D), "label": torch.zeros(1, K, H, W, D)}])


def test_aggregate_ignores_nan():
    case = _case(0, prompt_et=False)
    metric = CalibrationMetrics(metric="ece", voxel_set="box")
    values = metric(case["pred"].unsqueeze(0), case["label"].unsqueeze(0), box_mask=case["box_mask"].unsqueeze(0))
    assert math.isnan(values[0, 2].item())
    aggregated = metric.aggregate()
    assert torch.equal(aggregated[:2], values[0, :2])
    assert math.isnan(aggregated[2].item())  # no case has an ET box, so there is no mean


def test_aggregate_mean_over_cases():
    cases = [_case(0, prompt_et=False), _case(1)]
    metric = CalibrationMetrics(metric="brier", voxel_set="box", metric_reduction="mean")
    values = torch.cat(
        [metric(c["pred"].unsqueeze(0), c["label"].unsqueeze(0), box_mask=c["box_mask"].unsqueeze(0)) for c in cases]
    )
    finite = values[~torch.isnan(values)]
    assert metric.aggregate().item() == pytest.approx(finite.mean().item(), abs=1e-12)
    assert finite.numel() == 5


def test_box_fill_dice_hand_computed():
    # One region: a 2 x 2 lesion on one slice inside a 4 x 4 prompt box. Filling the box gives
    # Dice = 2 * 4 / (16 + 4) = 0.4, whatever the network predicts.
    label = torch.zeros((1, 8, 8, 3), dtype=torch.bool)
    label[0, 2:4, 2:4, 1] = True
    box = torch.zeros_like(label)
    box[0, 1:5, 1:5, 1] = True
    prob = torch.full(label.shape, 0.2)
    rows, _ = evaluate_case(
        prob, label, box, torch.ones((8, 8, 3), dtype=torch.bool), (1.0, 1.0, 1.0), region_names=["lesion"]
    )
    assert rows[0]["dice_box_fill"] == pytest.approx(0.4, abs=1e-12)
    assert rows[0]["dice"] == pytest.approx(0.0, abs=1e-12)
