"""Corruption suite: reproducible draws, severity order, kept geometry and labels, and the file cache."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic_cases import write_cases

from scripts import corruption_levels
from scripts.cases import load_case, load_datalist
from scripts.corruption_levels import CORRUPTIONS, SEVERITIES, parameter_table_markdown
from scripts.corruptions import ensure_corrupted

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"
SHAPE = (24, 28, 12)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    return load_datalist(write_cases(folder, count=2, shape=SHAPE))


def _voxels(item: dict) -> np.ndarray:
    return np.stack([nib.load(path).get_fdata(dtype=np.float32) for path in item["image"]])


def _by_level(results: list[dict]) -> dict:
    return {(r["source_case_id"], r["corruption"], r["severity"]): r for r in results}


def test_items_keys_and_order(items, tmp_path):
    results = ensure_corrupted(items, tmp_path, corruptions=("noise", "blur"), severities=(1, 5), progress=False)
    assert [r["case_id"] for r in results[:4]] == [
        "case000__noise1",
        "case000__noise5",
        "case000__blur1",
        "case000__blur5",
    ]
    assert len(results) == 8
    first = results[0]
    assert first["source_case_id"] == "case000"
    assert first["corruption"] == "noise"
    assert first["severity"] == 1
    assert first["label"] == items[0]["label"]
    assert first["domain"] == items[0]["domain"]
    assert first["subject"] == items[0]["subject"]
    assert [Path(p).name for p in first["image"]] == [Path(p).name for p in items[0]["image"]]
    assert Path(first["image"][0]).parent == tmp_path / "noise" / "severity1" / "case000"
    # The input items are not modified.
    assert items[0]["case_id"] == "case000"
    assert "corruption" not in items[0]


def test_geometry_dtype_and_label_kept(items, tmp_path):
    result = ensure_corrupted(items[:1], tmp_path, corruptions=("motion",), severities=(3,), progress=False)[0]
    for clean_path, corrupted_path in zip(items[0]["image"], result["image"]):
        clean, corrupted = nib.load(clean_path), nib.load(corrupted_path)
        assert corrupted.shape == clean.shape
        assert corrupted.get_data_dtype() == np.float32
        np.testing.assert_array_equal(corrupted.affine, clean.affine)
        np.testing.assert_array_equal(corrupted.header.get_sform(), clean.header.get_sform())
        assert not np.array_equal(corrupted.get_fdata(), clean.get_fdata())
    assert result["label"] == items[0]["label"]
    # The case loads through the bundle's loader with the clean brain mask.
    case = load_case(result)
    clean_case = load_case(items[0])
    assert torch.equal(case["brain"], clean_case["brain"])
    assert torch.equal(case["regions"], clean_case["regions"])


def test_same_seed_same_voxels(items, tmp_path):
    first = ensure_corrupted(items, tmp_path / "a", seed=3, progress=False)
    second = ensure_corrupted(items, tmp_path / "b", seed=3, progress=False)
    other = ensure_corrupted(items, tmp_path / "c", seed=4, progress=False)
    assert len(first) == 2 * len(CORRUPTIONS) * len(SEVERITIES)
    for a, b, c in zip(first, second, other):
        assert np.array_equal(_voxels(a), _voxels(b)), a["case_id"]
        assert not np.array_equal(_voxels(a), _voxels(c)), a["case_id"]


def test_order_and_subset_independent(items, tmp_path):
    full = _by_level(ensure_corrupted(items, tmp_path / "full", progress=False))
    subset = ensure_corrupted(
        items[::-1], tmp_path / "subset", corruptions=("blur", "spike"), severities=(4, 2), progress=False
    )
    assert [r["case_id"] for r in subset[:4]] == [
        "case001__blur4",
        "case001__blur2",
        "case001__spike4",
        "case001__spike2",
    ]
    for result in subset:
        key = (result["source_case_id"], result["corruption"], result["severity"])
        assert np.array_equal(_voxels(result), _voxels(full[key])), key


@pytest.mark.parametrize("corruption", ["noise", "blur", "bias_field", "ghosting", "spike"])
def test_strength_grows_with_severity(items, tmp_path, corruption):
    results = ensure_corrupted(items[:1], tmp_path, corruptions=(corruption,), progress=False)
    clean = _voxels(items[0])
    brain = np.any(clean != 0, axis=0)
    differences = [float(np.abs(_voxels(r) - clean)[:, brain].mean()) for r in results]
    assert differences[0] > 0
    for lower, higher in zip(differences, differences[1:]):
        assert higher > lower, differences


def test_noise_relative_to_intensity_scale(items, tmp_path):
    result = ensure_corrupted(items[:1], tmp_path, corruptions=("noise",), severities=(1,), progress=False)[0]
    clean = _voxels(items[0])
    brain = np.any(clean != 0, axis=0)
    residual = _voxels(result) - clean
    for channel in range(clean.shape[0]):
        scale = np.percentile(clean[channel][brain], 99.5)
        # Severity 1 draws the std from [0.02, 0.03] of the scale. The sample std of 8,064 voxels has a standard
        # error of 0.8 %, and the bounds leave 2.5 % around the range.
        relative = residual[channel].std() / scale
        assert 0.0195 <= relative <= 0.0306, (channel, relative)


def test_scaled_image_scaled_output(items, tmp_path):
    # Every level is equivariant to a positive scaling of the intensities, noise included.
    scaled_item = dict(items[0])
    scaled_item["image"] = []
    for path in items[0]["image"]:
        image = nib.load(path)
        target = tmp_path / "scaled" / Path(path).name
        target.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) * 10, image.affine), target)
        scaled_item["image"].append(str(target))
    plain = ensure_corrupted(items[:1], tmp_path / "plain", severities=(3,), progress=False)
    scaled = ensure_corrupted([scaled_item], tmp_path / "tenfold", severities=(3,), progress=False)
    for a, b in zip(plain, scaled):
        np.testing.assert_allclose(_voxels(b), 10 * _voxels(a), rtol=1e-4, atol=1e-2, err_msg=a["case_id"])


def test_zero_strength_is_identity(items, tmp_path, monkeypatch):
    monkeypatch.setitem(corruption_levels.LEVELS["noise"], 1, {"mean": 0.0, "std": (0.0, 0.0)})
    result = ensure_corrupted(items[:1], tmp_path, corruptions=("noise",), severities=(1,), progress=False)[0]
    np.testing.assert_allclose(_voxels(result), _voxels(items[0]), rtol=1e-6)


def test_cache_reused_and_rewritten(items, tmp_path, monkeypatch):
    def mtimes(results):
        return {r["case_id"]: Path(r["image"][0]).stat().st_mtime_ns for r in results}

    kwargs = {"corruptions": ("noise", "blur"), "severities": (1, 2), "progress": False}
    first = mtimes(ensure_corrupted(items, tmp_path, **kwargs))
    assert mtimes(ensure_corrupted(items, tmp_path, **kwargs)) == first

    # A changed parameter rewrites that level only.
    monkeypatch.setitem(corruption_levels.LEVELS["noise"], 1, {"mean": 0.0, "std": (0.05, 0.06)})
    changed = mtimes(ensure_corrupted(items, tmp_path, **kwargs))
    assert changed["case000__noise1"] != first["case000__noise1"]
    assert changed["case001__noise1"] != first["case001__noise1"]
    assert changed["case000__noise2"] == first["case000__noise2"]
    assert changed["case000__blur1"] == first["case000__blur1"]
    record = json.loads((tmp_path / "noise" / "severity1" / "case000" / "record.json").read_text())
    assert record["kwargs"]["std"] == [0.05, 0.06]

    # Another seed rewrites every level.
    reseeded = mtimes(ensure_corrupted(items, tmp_path, seed=1, **kwargs))
    assert all(reseeded[key] != changed[key] for key in reseeded)


def test_changed_input_rewritten(items, tmp_path):
    source = tmp_path / "source"
    case = dict(items[0])
    case["image"] = []
    for path in items[0]["image"]:
        target = source / Path(path).name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
        case["image"].append(str(target))
    result = ensure_corrupted([case], tmp_path / "out", corruptions=("blur",), severities=(2,), progress=False)[0]
    before = _voxels(result)
    image = nib.load(case["image"][0])
    nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32) * 2, image.affine), case["image"][0])
    ensure_corrupted([case], tmp_path / "out", corruptions=("blur",), severities=(2,), progress=False)
    after = _voxels(result)
    np.testing.assert_allclose(after[0], 2 * before[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(after[1:], before[1:])


def test_invalid_requests_rejected(items, tmp_path):
    with pytest.raises(ValueError, match="Unknown corruption 'rain'"):
        ensure_corrupted(items, tmp_path, corruptions=("rain",))
    with pytest.raises(ValueError, match="must be one of"):
        ensure_corrupted(items, tmp_path, severities=(6,))
    with pytest.raises(ValueError, match="appears twice"):
        ensure_corrupted([items[0], items[0]], tmp_path)
    with pytest.raises(ValueError, match="cannot name a folder"):
        ensure_corrupted([{**items[0], "case_id": "../escape"}], tmp_path)


def test_docs_table_matches_levels():
    page = (BUNDLE / "docs" / "corruptions.md").read_text()
    assert parameter_table_markdown() in page
