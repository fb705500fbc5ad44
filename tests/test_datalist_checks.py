"""Datalist checks: each kind of broken input on a small synthetic file, all problems in one error, and the hook
that runs the check before training or evaluation starts."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from synthetic_cases import write_cases

from scripts.cases import load_case, load_datalist
from scripts.datalist_checks import DatalistError, check_datalist, replace_nonfinite

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"
SHAPE = (16, 16, 8)


@pytest.fixture
def items(tmp_path):
    datalist = write_cases(tmp_path / "data", count=2, shape=SHAPE)
    return load_datalist(datalist)


def _rewrite(path: str, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    affine = nib.load(path).affine if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), path)


def _problems(items, **kwargs) -> list:
    with pytest.raises(DatalistError) as caught:
        check_datalist(items, **kwargs)
    return caught.value.problems


def test_clean_datalist_passes(items):
    summary = check_datalist(items, image_channels=[3, 1, 2])
    assert summary.cases == 2
    # Four modalities and one label per case.
    assert summary.files == 10
    assert summary.nonfinite_voxels == {}


def test_missing_file_reported(items):
    missing = items[0]["image"][2]
    os.remove(missing)
    problems = _problems(items)
    assert len(problems) == 1
    assert problems[0].path == missing
    assert problems[0].case_id == "case000"
    assert "not found" in problems[0].reason


def test_truncated_gzip_reported(items):
    label = items[1]["label"]
    content = Path(label).read_bytes()
    Path(label).write_bytes(content[: len(content) // 2])
    problems = _problems(items)
    assert [p.path for p in problems] == [label]
    assert "truncated" in problems[0].reason


def test_damaged_header_reported(items):
    image = items[0]["image"][0]
    Path(image).write_bytes(b"not a nifti file" * 8)
    problems = _problems(items)
    assert [p.path for p in problems] == [image]
    assert "unreadable NIfTI header" in problems[0].reason


def test_label_shape_mismatch_reported(items):
    label = items[0]["label"]
    _rewrite(label, np.zeros((16, 16, 7), dtype=np.uint8) + 1)
    problems = _problems(items)
    assert [p.path for p in problems] == [label]
    assert "(16, 16, 7) differs from (16, 16, 8)" in problems[0].reason


def test_affine_mismatch_beyond_tolerance(items):
    image = items[0]["image"][1]
    data = np.asanyarray(nib.load(image).dataobj)
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 2.0
    _rewrite(image, data, shifted)
    problems = _problems(items)
    assert [p.path for p in problems] == [image]
    assert "affine differs" in problems[0].reason
    assert "by 2 mm" in problems[0].reason


def test_affine_difference_within_tolerance_passes(items):
    image = items[0]["image"][1]
    data = np.asanyarray(nib.load(image).dataobj)
    nudged = np.diag([2.0, 2.0, 2.0, 1.0])
    nudged[0, 3] = 1e-5
    _rewrite(image, data, nudged)
    assert check_datalist(items).cases == 2


def test_nonfinite_voxels_error_policy(items):
    image = items[1]["image"][0]
    data = np.asanyarray(nib.load(image).dataobj).copy()
    data[0, 0, :3] = np.nan
    data[1, 1, :2] = np.inf
    _rewrite(image, data)
    problems = _problems(items, nonfinite="error")
    assert [p.path for p in problems] == [image]
    assert "5 non-finite voxels" in problems[0].reason


def test_nonfinite_voxels_zero_policy_logs_count(items, caplog):
    image = items[1]["image"][0]
    data = np.asanyarray(nib.load(image).dataobj).copy()
    data[2, 3, 4] = -np.inf
    data[5, 6, 7] = np.nan
    _rewrite(image, data)
    with caplog.at_level(logging.WARNING, logger="scripts.datalist_checks"):
        summary = check_datalist(items, nonfinite="zero")
    assert summary.nonfinite_voxels == {image: 2}
    assert any(image in record.getMessage() and "2 non-finite" in record.getMessage() for record in caplog.records)


def test_load_case_replaces_nonfinite_with_zero(items, caplog):
    image = items[0]["image"][2]
    data = np.asanyarray(nib.load(image).dataobj).copy()
    data[4, 4, 4] = np.nan
    data[4, 5, 4] = np.inf
    _rewrite(image, data)
    with caplog.at_level(logging.WARNING, logger="scripts.datalist_checks"):
        case = load_case(items[0], nonfinite="zero")
    assert bool(torch.isfinite(case["image"]).all())
    assert float(case["image"][2, 4, 4, 4]) == 0.0
    assert float(case["image"][2, 4, 5, 4]) == 0.0
    messages = [record.getMessage() for record in caplog.records]
    assert any("Replaced 2 non-finite" in message and image in message for message in messages)
    with pytest.raises(ValueError, match="Non-finite voxels"):
        load_case(items[0], nonfinite="error")


def test_replace_nonfinite_counts_per_channel_file():
    image = torch.ones((2, 3, 3, 3))
    image[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError) as caught:
        replace_nonfinite(image, "error", ["a.nii.gz", "b.nii.gz"])
    assert "'b.nii.gz': 1" in str(caught.value)
    assert "a.nii.gz" not in str(caught.value)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        replace_nonfinite(image, "drop", "a.nii.gz")


def test_4d_file_among_modality_files(items):
    image = items[0]["image"][3]
    data = np.asanyarray(nib.load(image).dataobj)
    _rewrite(image, np.stack([data, data], axis=-1))
    problems = _problems(items)
    assert [p.path for p in problems] == [image]
    assert "4D volume where one 3D modality file is expected" in problems[0].reason


def test_single_4d_image_channel_count(items):
    case = items[0]
    stacked = np.stack([np.asanyarray(nib.load(path).dataobj) for path in case["image"][:2]], axis=-1)
    multichannel = str(Path(case["image"][0]).with_name("case000_stack.nii.gz"))
    nib.save(nib.Nifti1Image(stacked, np.diag([2.0, 2.0, 2.0, 1.0])), multichannel)
    case["image"] = multichannel
    problems = _problems([case], image_channels=[3, 1, 2])
    assert [p.path for p in problems] == [multichannel]
    assert "it has 2" in problems[0].reason
    # Two channels with the default selection cannot fill three RGB channels either.
    problems = _problems([case])
    assert "2 channels" in problems[0].reason
    assert check_datalist([case], image_channels=[0, 1, 1]).cases == 1


def test_unexpected_label_values(items):
    label = items[0]["label"]
    data = np.asanyarray(nib.load(label).dataobj).copy()
    data[data == 4] = 3
    _rewrite(label, data)
    problems = _problems(items, label_convention="brats2021")
    assert [p.path for p in problems] == [label]
    assert "label values [3]" in problems[0].reason
    # The other, untouched case still uses code 4, which BraTS 2023 does not have.
    problems = _problems(items, label_convention="brats2023")
    assert [p.path for p in problems] == [items[1]["label"]]
    assert "label values [4]" in problems[0].reason


def test_empty_label(items):
    label = items[1]["label"]
    _rewrite(label, np.zeros(SHAPE, dtype=np.uint8))
    problems = _problems(items)
    assert [p.path for p in problems] == [label]
    assert "empty" in problems[0].reason
    assert check_datalist(items, allow_empty_label=True).cases == 2


def test_missing_label_entry(items):
    del items[0]["label"]
    problems = _problems(items)
    assert problems[0].path is None
    assert "no 'label'" in problems[0].reason
    assert check_datalist(items, require_label=False).cases == 2


def test_qform_sform_disagreement(items):
    image = items[0]["image"][0]
    loaded = nib.load(image)
    data = np.asanyarray(loaded.dataobj)
    moved = nib.Nifti1Image(data, loaded.affine)
    qform = loaded.affine.copy()
    qform[2, 3] += 5.0
    moved.set_qform(qform, code=1)
    moved.set_sform(loaded.affine, code=1)
    nib.save(moved, image)
    problems = _problems(items)
    assert [p.path for p in problems] == [image]
    assert "qform and sform disagree by 5 mm" in problems[0].reason


def test_all_problems_in_one_error(items, tmp_path):
    more = load_datalist(write_cases(tmp_path / "more", count=3, shape=SHAPE, seed=1))
    for number, item in enumerate(more):
        item["case_id"] = f"extra{number}"
    everything = items + more
    os.remove(everything[0]["image"][1])
    content = Path(everything[2]["label"]).read_bytes()
    Path(everything[2]["label"]).write_bytes(content[: len(content) // 2])
    _rewrite(everything[4]["label"], np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(DatalistError) as caught:
        check_datalist(everything, num_workers=2)
    message = str(caught.value)
    assert len(caught.value.problems) == 3
    assert "3 problem(s) in 3 of 5 cases" in message
    for path in (everything[0]["image"][1], everything[2]["label"], everything[4]["label"]):
        assert path in message


def test_invalid_options_rejected(items):
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        check_datalist(items, nonfinite="ignore")
    with pytest.raises(ValueError, match="Unknown label convention"):
        check_datalist(items, label_convention="brats2019")


@pytest.mark.parametrize("workflow", ["training", "evaluate"])
def test_workflow_reports_problems_before_embedding(tmp_path, workflow):
    datalist = write_cases(tmp_path / "data", count=3, shape=SHAPE)
    entries = json.loads(Path(datalist).read_text())["training"]
    os.remove(tmp_path / "data" / entries[0]["image"][0])
    label = tmp_path / "data" / entries[1]["label"]
    content = label.read_bytes()
    label.write_bytes(content[: len(content) // 2])
    override = {
        "bundle_root": str(tmp_path / "run"),
        "datalist": datalist,
        "source_domains": ["scanner_a", "scanner_b"],
        "device": "$torch.device('cpu')",
        "sam_variant": "small",
        "sam_image_size": 64,
        "sam_checkpoint": None,
    }
    override_path = tmp_path / "override.yaml"
    override_path.write_text(yaml.safe_dump(override))
    configs = [str(BUNDLE / "configs" / "train.yaml"), str(override_path)]
    if workflow == "evaluate":
        configs.insert(1, str(BUNDLE / "configs" / "evaluate.yaml"))
    command = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(configs)]
    environment = dict(os.environ, PYTHONPATH=str(BUNDLE), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=BUNDLE, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "2 problem(s) in 2 of 3 cases" in result.stderr
    assert entries[0]["image"][0].split("/")[-1] in result.stderr
    assert entries[1]["label"].split("/")[-1] in result.stderr
    # The check ran before any case was embedded.
    assert not (tmp_path / "run" / "cache").exists()
