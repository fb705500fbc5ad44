"""Datalist builders on synthetic BraTS 2021, BraTS 2023 and ATLAS v2.0 folders with the releases' file names."""

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.cases import load_datalist
from scripts.datalist_builders import (
    DatalistBuildError,
    build_atlas_datalist,
    build_brats_datalist,
    read_domain_csv,
    write_datalist,
)
from scripts.datalist_checks import DatalistError, check_datalist
from scripts.splits import domain_split

REPOSITORY = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 4)
BRATS2021 = ("t1", "t1ce", "t2", "flair")
BRATS2023 = ("t1n", "t1c", "t2w", "t2f")
ATLAS_SPACE = "space-MNI152NLin2009aSym"


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0])), path)


def _label(codes: tuple[int, ...]) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    for position, code in enumerate(codes):
        label[2 + position, 2:5, 1:3] = code
    return label


def write_brats2021(root: Path, numbers: list[int]) -> None:
    for number in numbers:
        case = f"BraTS2021_{number:05d}"
        for index, modality in enumerate(BRATS2021):
            # Each modality has its own constant value, so a test can tell the channel order from the voxels.
            _save(root / case / f"{case}_{modality}.nii.gz", np.full(SHAPE, index + 1, dtype=np.float32))
        _save(root / case / f"{case}_seg.nii.gz", _label((1, 2, 4)))


def write_brats2023(root: Path, subjects: list[int], timepoints: int = 1) -> None:
    for subject in subjects:
        for timepoint in range(timepoints):
            case = f"BraTS-GLI-{subject:05d}-{timepoint:03d}"
            for index, modality in enumerate(BRATS2023):
                _save(root / case / f"{case}-{modality}.nii.gz", np.full(SHAPE, index + 1, dtype=np.float32))
            _save(root / case / f"{case}-seg.nii.gz", _label((1, 2, 3)))


def write_atlas(root: Path, subjects: dict[str, list[str]]) -> None:
    for cohort, names in subjects.items():
        for subject in names:
            anat = root / "Training" / cohort / subject / "ses-1" / "anat"
            prefix = f"{subject}_ses-1_{ATLAS_SPACE}"
            _save(anat / f"{prefix}_T1w.nii.gz", np.full(SHAPE, 50.0, dtype=np.float32))
            _save(anat / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz", _label((1,)))


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "case,scanner") -> Path:
    path.write_text(header + "\n" + "".join(f"{case},{value}\n" for case, value in rows), encoding="utf-8")
    return path


def _problems(function, *args, **kwargs) -> list[str]:
    with pytest.raises(DatalistBuildError) as caught:
        function(*args, **kwargs)
    return caught.value.problems


def test_brats2021_entries_and_order(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1, 2])
    datalist = build_brats_datalist(root)
    assert datalist["label_convention"] == "brats2021"
    assert datalist["modality"] == list(BRATS2021)
    assert datalist["numTraining"] == 3
    first = datalist["training"][0]
    assert first["case_id"] == "BraTS2021_00000"
    assert first["subject"] == "BraTS2021_00000"
    assert first["domain"] == "unknown"
    assert [Path(p).name for p in first["image"]] == [f"BraTS2021_00000_{m}.nii.gz" for m in BRATS2021]
    assert Path(first["label"]).name == "BraTS2021_00000_seg.nii.gz"


def test_written_datalist_loads_relative(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1])
    output = write_datalist(build_brats_datalist(root), tmp_path / "lists" / "datalist.json")
    raw = json.loads(output.read_text())
    assert raw["training"][0]["image"][0] == "../brats/BraTS2021_00000/BraTS2021_00000_t1.nii.gz"
    items = load_datalist(output)
    assert Path(items[1]["label"]).resolve() == root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    # The files pass the bundle's own check with the reported convention and the recipe's channels.
    summary = check_datalist(items, label_convention=raw["label_convention"], image_channels=[3, 1, 2])
    assert summary.files == 10
    # Channel order t1, t1ce, t2, flair: the written modality values are 1, 2, 3, 4.
    values = [float(nib.load(path).get_fdata()[0, 0, 0]) for path in items[0]["image"]]
    assert values == [1.0, 2.0, 3.0, 4.0]
    assert not list(output.parent.glob(".*tmp*"))


def test_brats2023_subjects_and_convention(tmp_path):
    root = tmp_path / "brats23"
    write_brats2023(root, [0, 7], timepoints=2)
    datalist = build_brats_datalist(root)
    assert datalist["label_convention"] == "brats2023"
    assert datalist["modality"] == list(BRATS2023)
    cases = {entry["case_id"]: entry["subject"] for entry in datalist["training"]}
    assert cases == {
        "BraTS-GLI-00000-000": "BraTS-GLI-00000",
        "BraTS-GLI-00000-001": "BraTS-GLI-00000",
        "BraTS-GLI-00007-000": "BraTS-GLI-00007",
        "BraTS-GLI-00007-001": "BraTS-GLI-00007",
    }
    names = [Path(p).name for p in datalist["training"][0]["image"]]
    assert names == [f"BraTS-GLI-00000-000-{m}.nii.gz" for m in BRATS2023]
    items = load_datalist(write_datalist(datalist, root / "datalist.json"))
    check_datalist(items, label_convention="brats2023")
    with pytest.raises(DatalistError, match="outside the 'brats2021' convention"):
        check_datalist(items, label_convention="brats2021")


def test_csv_maps_cases_and_subjects(tmp_path):
    root = tmp_path / "brats23"
    write_brats2023(root, [0, 1], timepoints=2)
    # One row by subject (both timepoints) and two rows by case id.
    csv_path = write_csv(
        tmp_path / "scanners.csv",
        [("BraTS-GLI-00000", "siemens"), ("BraTS-GLI-00001-000", "ge"), ("BraTS-GLI-00001-001", "ge")],
    )
    datalist = build_brats_datalist(root, domains_csv=csv_path, domain_column="scanner")
    scanners = {entry["case_id"]: (entry["scanner"], entry["domain"]) for entry in datalist["training"]}
    assert scanners == {
        "BraTS-GLI-00000-000": ("siemens", "siemens"),
        "BraTS-GLI-00000-001": ("siemens", "siemens"),
        "BraTS-GLI-00001-000": ("ge", "ge"),
        "BraTS-GLI-00001-001": ("ge", "ge"),
    }
    assert datalist["builder"]["domains"] == {"ge": 2, "siemens": 2}
    assert datalist["builder"]["domain_column"] == "scanner"


def test_csv_named_id_column_and_bom(tmp_path):
    path = tmp_path / "sites.csv"
    path.write_text("\ufeffsite,case\nA, BraTS2021_00000 \n", encoding="utf-8")
    assert read_domain_csv(path, "site", id_column="case") == {"BraTS2021_00000": "A"}


def test_csv_missing_column_rejected(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0])
    csv_path = write_csv(tmp_path / "s.csv", [("BraTS2021_00000", "siemens")])
    problems = _problems(build_brats_datalist, root, domains_csv=csv_path, domain_column="vendor")
    assert len(problems) == 1
    assert "['vendor'] not found in the header ['case', 'scanner']" in problems[0]


def test_case_missing_from_csv_rejected(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1])
    csv_path = write_csv(tmp_path / "s.csv", [("BraTS2021_00000", "siemens")])
    problems = _problems(build_brats_datalist, root, domains_csv=csv_path, domain_column="scanner")
    assert len(problems) == 1
    assert problems[0].startswith("BraTS2021_00001: no row in")
    assert "--skip-unmatched" in problems[0]


def test_csv_row_without_folder_rejected(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0])
    csv_path = write_csv(tmp_path / "s.csv", [("BraTS2021_00000", "siemens"), ("BraTS2021_00099", "ge")])
    problems = _problems(build_brats_datalist, root, domains_csv=csv_path, domain_column="scanner")
    assert len(problems) == 1
    assert "'BraTS2021_00099' matches no case folder" in problems[0]


def test_skip_unmatched_warns(tmp_path, caplog):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1])
    csv_path = write_csv(tmp_path / "s.csv", [("BraTS2021_00000", "siemens"), ("BraTS2021_00099", "ge")])
    with caplog.at_level(logging.WARNING, logger="scripts.datalist_builders"):
        datalist = build_brats_datalist(root, domains_csv=csv_path, domain_column="scanner", skip_unmatched=True)
    assert [entry["case_id"] for entry in datalist["training"]] == ["BraTS2021_00000"]
    assert len(datalist["builder"]["skipped"]) == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert any("BraTS2021_00001" in message and "left out" in message for message in warnings)
    assert any("BraTS2021_00099" in message and "ignored" in message for message in warnings)


def test_conflicting_and_empty_csv_rows(tmp_path):
    path = write_csv(tmp_path / "s.csv", [("a", "siemens"), ("a", "ge"), ("b", "")])
    with pytest.raises(DatalistBuildError) as caught:
        read_domain_csv(path, "scanner")
    problems = caught.value.problems
    assert len(problems) == 2
    assert "line 3: 'a' is listed again with scanner 'ge' after 'siemens'" in problems[0]
    assert "line 4: 'b' has an empty 'scanner' value" in problems[1]


def test_missing_modality_named(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1])
    missing = root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    missing.unlink()
    (root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    problems = _problems(build_brats_datalist, root)
    assert len(problems) == 2
    assert problems[0].startswith(str(root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"))
    assert problems[1].startswith(f"{missing}: t2 file not found")


def test_missing_label_allowed_without_labels(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0])
    (root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    datalist = build_brats_datalist(root, require_label=False)
    assert "label" not in datalist["training"][0]


def test_mixed_naming_rejected(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0])
    write_brats2023(root, [0])
    problems = _problems(build_brats_datalist, root)
    assert len(problems) == 1
    assert "mixes BraTS 2021 case folders" in problems[0]
    assert "build one datalist per release" in problems[0]


def test_unknown_folder_skipped_with_warning(tmp_path, caplog):
    root = tmp_path / "brats"
    write_brats2021(root, [0])
    (root / "notes").mkdir()
    (root / "name_mapping.csv").write_text("a,b\n")
    with caplog.at_level(logging.WARNING, logger="scripts.datalist_builders"):
        datalist = build_brats_datalist(root)
    assert datalist["numTraining"] == 1
    assert any(str(root / "notes") in record.getMessage() for record in caplog.records)


def test_no_case_folder_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    problems = _problems(build_brats_datalist, tmp_path / "empty")
    assert "no BraTS case folder found" in problems[0]
    with pytest.raises(FileNotFoundError, match="not found"):
        build_brats_datalist(tmp_path / "absent")


def test_atlas_sites_and_convention(tmp_path):
    root = tmp_path / "ATLAS_2"
    write_atlas(root, {"R001": ["sub-r001s001", "sub-r001s002"], "R004": ["sub-r004s001"]})
    # The release's Testing set has no masks and is not read.
    (root / "Testing" / "R001").mkdir(parents=True)
    datalist = build_atlas_datalist(root)
    assert datalist["label_convention"] == "binary"
    entries = datalist["training"]
    assert [(e["case_id"], e["subject"], e["site"], e["domain"]) for e in entries] == [
        ("sub-r001s001_ses-1", "sub-r001s001", "R001", "R001"),
        ("sub-r001s002_ses-1", "sub-r001s002", "R001", "R001"),
        ("sub-r004s001_ses-1", "sub-r004s001", "R004", "R004"),
    ]
    assert Path(entries[0]["image"][0]).name == f"sub-r001s001_ses-1_{ATLAS_SPACE}_T1w.nii.gz"
    assert Path(entries[0]["label"]).name == f"sub-r001s001_ses-1_{ATLAS_SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    items = load_datalist(write_datalist(datalist, root / "datalist.json"))
    check_datalist(items, label_convention="binary", image_channels=[0, 0, 0])
    # The Training folder itself is accepted as the root too.
    assert build_atlas_datalist(root / "Training")["numTraining"] == 3


def test_atlas_missing_mask_named(tmp_path):
    root = tmp_path / "ATLAS_2"
    write_atlas(root, {"R002": ["sub-r002s001"]})
    mask = next((root / "Training").rglob("*_mask.nii.gz"))
    mask.unlink()
    problems = _problems(build_atlas_datalist, root)
    assert len(problems) == 1
    assert problems[0].startswith(f"{mask}: lesion mask not found")
    assert build_atlas_datalist(root, require_label=False)["numTraining"] == 1


def test_atlas_csv_overrides_domain(tmp_path):
    root = tmp_path / "ATLAS_2"
    write_atlas(root, {"R001": ["sub-r001s001"], "R002": ["sub-r002s001"]})
    csv_path = write_csv(tmp_path / "s.csv", [("sub-r001s001", "3T"), ("sub-r002s001", "1.5T")], "id,field")
    entries = build_atlas_datalist(root, domains_csv=csv_path, domain_column="field")["training"]
    assert [(e["site"], e["field"], e["domain"]) for e in entries] == [("R001", "3T", "3T"), ("R002", "1.5T", "1.5T")]


def test_split_keeps_subjects_whole(tmp_path):
    root = tmp_path / "brats23"
    write_brats2023(root, list(range(8)), timepoints=2)
    rows = [(f"BraTS-GLI-{s:05d}", "siemens" if s < 6 else "ge") for s in range(8)]
    datalist = build_brats_datalist(root, domains_csv=write_csv(tmp_path / "s.csv", rows), domain_column="scanner")
    items = load_datalist(write_datalist(datalist, root / "datalist.json"))
    for seed in range(5):
        split = domain_split(items, ["siemens"], domain_key="scanner", val_fraction=0.2, test_fraction=0.2, seed=seed)
        subjects = {name: {item["subject"] for item in cases} for name, cases in split.items()}
        names = sorted(subjects)
        for position, first in enumerate(names):
            for second in names[position + 1 :]:
                assert not subjects[first] & subjects[second], (seed, first, second)
        # Both timepoints of every subject land in the same split.
        for cases in split.values():
            per_subject = Counter(item["subject"] for item in cases)
            assert set(per_subject.values()) <= {2}
        assert subjects["test_target"] == {"BraTS-GLI-00006", "BraTS-GLI-00007"}
        assert all(item["scanner"] == "siemens" for item in split["train"])
        assert sum(len(cases) for cases in split.values()) == 16


def test_command_line_writes_and_reports(tmp_path):
    root = tmp_path / "brats"
    write_brats2021(root, [0, 1])
    csv_path = write_csv(tmp_path / "s.csv", [("BraTS2021_00000", "siemens"), ("BraTS2021_00001", "ge")])
    output = tmp_path / "out" / "list.json"
    script = REPOSITORY / "calsam_bundle" / "scripts" / "build_datalist.py"
    command = [sys.executable, str(script), "brats", str(root), "--output", str(output)]
    command += ["--domains-csv", str(csv_path), "--domain-column", "scanner", "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 case(s) of 2 subject(s)" in result.stdout
    assert "--label_convention brats2021 --domain_key scanner" in result.stdout
    assert [e["scanner"] for e in json.loads(output.read_text())["training"]] == ["siemens", "ge"]

    (root / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").unlink()
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert "BraTS2021_00001_flair.nii.gz: flair file not found" in failed.stderr
