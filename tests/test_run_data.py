"""Where a training run's entries come from: the datalist's domain split, or lists given in the config."""

from pathlib import Path

import pytest
import torch
from synthetic_cases import write_cases

from scripts.run_data import DatalistSplit, entries_to_check, profile_parts, run_entries
from scripts.slabs import CaseDataset, SlabDataset
from scripts.tracking import data_profile

SHAPE = (16, 16, 8)


@pytest.fixture
def datalist(tmp_path):
    return write_cases(tmp_path / "data", count=6, shape=SHAPE, domains=("scanner_a", "scanner_b"))


def given_entries(folder: Path) -> list[dict]:
    """Entries as MONAI Label sends them: image and label only, no case_id, domain or subject."""
    return [
        {"image": str(folder / f"brain{n:02d}.nii.gz"), "label": str(folder / f"label{n:02d}.nii.gz")} for n in (1, 2)
    ]


def make_split(datalist_path) -> DatalistSplit:
    return DatalistSplit(datalist_path, ["scanner_a"], val_fraction=0.34, test_fraction=0.0, seed=0)


def test_split_reads_datalist_on_first_use(datalist):
    split = make_split(datalist)
    assert not split.loaded
    parts = split.parts
    assert split.loaded
    # Of the three scanner_a subjects, one validates and two train. The three scanner_b cases are target tests.
    assert len(parts["train"]) == 2
    assert len(parts["val"]) == 1
    assert parts["test_source"] == []
    assert len(parts["test_target"]) == 3
    assert len(split.items) == 6


def test_given_entries_never_open_datalist(tmp_path):
    split = make_split(tmp_path / "missing" / "datalist.json")
    train, val = given_entries(tmp_path)[:1], given_entries(tmp_path)[1:]
    checked = entries_to_check(train, val, split)
    assert [entry["case_id"] for entry in checked] == ["brain01", "brain02"]
    assert not split.loaded
    parts = profile_parts(train, val, split)
    assert set(parts) == {"train", "val"}
    assert not split.loaded


def test_datalist_run_checks_every_entry(datalist):
    split = make_split(datalist)
    checked = entries_to_check(split.parts["train"], split.parts["val"], split)
    assert sorted(entry["case_id"] for entry in checked) == [f"case{n:03d}" for n in range(6)]


def test_given_train_adds_to_datalist_entries(datalist, tmp_path):
    split = make_split(datalist)
    checked = entries_to_check(given_entries(tmp_path), split.parts["val"], split)
    assert len(checked) == 6 + 2
    assert {"brain01", "brain02"} <= {entry["case_id"] for entry in checked}


def test_profile_of_datalist_run_keeps_test_parts(datalist):
    split = make_split(datalist)
    profile = data_profile(profile_parts(split.parts["train"], split.parts["val"], split))
    assert profile["data/train/cases"] == 2
    assert profile["data/val/cases"] == 1
    assert profile["data/test_target/cases"] == 3
    assert profile["data/test_target/domains"] == "scanner_b"


def test_profile_of_given_entries(tmp_path):
    entries = given_entries(tmp_path)
    profile = data_profile(profile_parts(entries[:1], entries[1:], make_split(tmp_path / "none.json")))
    assert profile == {
        "data/train/cases": 1,
        "data/train/domains": "unknown",
        "data/val/cases": 1,
        "data/val/domains": "unknown",
    }


def test_run_entries_keeps_datalist_entries(datalist):
    items = make_split(datalist).items
    assert all(a is b for a, b in zip(run_entries(items, "train#dataset#data"), items))


def test_run_entries_names_given_entries(tmp_path):
    entries = given_entries(tmp_path)
    named = run_entries(entries, "train#dataset#data")
    assert [entry["case_id"] for entry in named] == ["brain01", "brain02"]
    assert named[0]["image"] == entries[0]["image"]
    assert "case_id" not in entries[0]


def test_empty_validation_names_key_and_fix():
    with pytest.raises(ValueError) as error:
        run_entries([], "validate#dataset#data")
    assert "validate#dataset#data is empty" in str(error.value)
    assert "val_split" in str(error.value)


@pytest.mark.parametrize("entries", [[{"label": "a.nii.gz"}], ["a.nii.gz"], "a.nii.gz"])
def test_malformed_entries_rejected(entries):
    with pytest.raises(ValueError, match="train#dataset#data"):
        run_entries(entries, "train#dataset#data")


def prepared_case(case_id: str, count: int) -> dict:
    return {
        "case_id": case_id,
        "slice_index": torch.arange(count),
        "slices": torch.zeros(count, 3, 4, 4, dtype=torch.uint8),
        "embeddings": torch.zeros(count, 2, 1, 1),
        "regions": torch.zeros(count, 1, 4, 4, dtype=torch.uint8),
        "boxes": torch.zeros(count, 1, 4),
        "valid": torch.ones(count, 1, dtype=torch.bool),
    }


def test_datasets_keep_their_entries(tmp_path):
    entries = given_entries(tmp_path)
    cases = [prepared_case("brain01", 4), prepared_case("brain02", 2)]
    slabs = SlabDataset(cases, slab_size=2, data=entries)
    assert slabs.data is entries
    # Four slices give slabs at 0 and 2, two slices one slab.
    assert len(slabs) == 3
    whole = CaseDataset(cases, data=entries)
    assert whole.data is entries
    assert len(whole) == 2
    assert whole[1]["case_id"] == "brain02"


def test_datasets_reject_entry_count_mismatch(tmp_path):
    cases = [prepared_case("brain01", 4)]
    with pytest.raises(ValueError, match="2 data entries for 1 prepared cases"):
        SlabDataset(cases, data=given_entries(tmp_path))
    with pytest.raises(ValueError, match="2 data entries for 1 prepared cases"):
        CaseDataset(cases, data=given_entries(tmp_path))
