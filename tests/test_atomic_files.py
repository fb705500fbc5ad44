"""Files written atomically get the permissions of a normally created file, not mkstemp's private 0600."""

import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.atomic_checkpoint import write_atomic
from scripts.atomic_files import default_file_mode, temporary_sibling
from scripts.tracking import write_json_atomic
from scripts.volume_writer import reference_geometry, write_nifti_like


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_mode_follows_umask():
    previous = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
    finally:
        os.umask(previous)


def test_temporary_sibling_mode(tmp_path, umask_022):
    handle, temporary = temporary_sibling(tmp_path / "result.json")
    os.close(handle)
    assert os.path.dirname(temporary) == str(tmp_path)
    assert _mode(temporary) == 0o644


def test_json_checkpoint_and_nifti_readable(tmp_path, umask_022):
    write_json_atomic({"dice": 0.8}, tmp_path / "summary.json")
    write_atomic({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    reference = tmp_path / "input" / "image.nii.gz"
    reference.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), reference)
    write_nifti_like(np.zeros((4, 5, 6), np.float32), reference_geometry(reference), tmp_path / "probability.nii.gz")
    for name in ("summary.json", "model.pt", "probability.nii.gz"):
        assert _mode(tmp_path / name) == 0o644, name
    assert json.loads((tmp_path / "summary.json").read_text()) == {"dice": 0.8}
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
