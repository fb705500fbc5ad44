"""End to end: ``python -m monai.bundle run training`` then ``evaluate`` on tiny NIfTI cases, as a user runs them."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from synthetic_cases import write_cases

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"


def _run_bundle(run_id: str, configs: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        str(configs),
        "--meta_file",
        str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file",
        str(BUNDLE / "configs" / "logging.conf"),
    ]
    environment = dict(os.environ, PYTHONPATH=str(BUNDLE))
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_run")
    datalist = write_cases(root / "data", count=8)
    override = {
        "bundle_root": str(root),
        "datalist": datalist,
        "source_domains": ["scanner_a"],
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "device": "$torch.device('cpu')",
        "sam_variant": "small",
        "sam_image_size": 256,
        "sam_checkpoint": None,
        "max_epochs": 2,
        "fip#weight": 0.1,
        "fip#warmup_epochs": 0,
        "cmp#weight": 0.5,
        "cmp#warmup_epochs": 0,
    }
    override_path = root / "tiny.yaml"
    override_path.write_text(yaml.safe_dump(override))
    train_yaml, evaluate_yaml = str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "evaluate.yaml")
    training = _run_bundle("training", [train_yaml, str(override_path)], cwd=BUNDLE)
    evaluation = _run_bundle("evaluate", [train_yaml, evaluate_yaml, str(override_path)], cwd=BUNDLE)
    return root, training, evaluation


def test_training_writes_decoder_checkpoint(trained_bundle):
    root, training, _ = trained_bundle
    assert training.returncode == 0, training.stderr[-4000:]
    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == "calsam-decoder-v1"
    assert checkpoint["network"]["variant"] == "small"
    assert all(key.startswith(("transformer", "iou", "mask_tokens", "output")) for key in checkpoint["mask_decoder"])


def test_penalties_logged_every_iteration(trained_bundle):
    root, training, _ = trained_bundle
    assert training.returncode == 0, training.stderr[-4000:]
    with sqlite3.connect(root / "eval" / "mlruns.db") as database:
        keys = {row[0] for row in database.execute("SELECT DISTINCT key FROM metrics")}
        params = {row[0]: row[1] for row in database.execute("SELECT key, value FROM params")}
        fip_steps = database.execute("SELECT COUNT(*) FROM metrics WHERE key LIKE '%fip'").fetchone()[0]
        loss_steps = database.execute("SELECT COUNT(*) FROM metrics WHERE key LIKE '%seg_loss'").fetchone()[0]
    assert any(key.endswith("fip") for key in keys)
    assert any(key.endswith("cmp") for key in keys)
    assert "val_mean_dice" in keys
    assert "val_hd95_mm" in keys
    assert "val_ece_box" in keys
    assert fip_steps == loss_steps > 0
    assert params["fip/weight"] == "0.1"
    assert params["cmp/weight"] == "0.5"
    assert params["data/train/cases"] == "2"


def test_evaluate_writes_report_per_domain(trained_bundle):
    root, _, evaluation = trained_bundle
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    folder = root / "eval" / "evaluation"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["metrics"]) == {"scanner_a", "scanner_b"}
    for domain in ("scanner_a", "scanner_b"):
        for region in ("TC", "WT", "ET"):
            metrics = summary["metrics"][domain][region]
            assert 0.0 <= metrics["dice"]["mean"] <= 1.0
            assert metrics["hd95_mm"]["mean"] >= 0.0
            assert metrics["ece_box"]["count"] >= 1
    csv_rows = (folder / "per_case.csv").read_text().strip().splitlines()
    # Header plus one row per case and region: 1 source test case + 4 target cases, 3 regions each.
    assert len(csv_rows) == 1 + 5 * 3
    assert "summary.json" in evaluation.stdout + evaluation.stderr
