"""Image layouts that ``cases.load_case`` accepts (one 3D file per channel, one 4D file) and the ones it rejects."""

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.cases import load_case

SHAPE = (12, 10, 6)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def save(path, array) -> str:
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return str(path)


@pytest.fixture
def volume():
    """Four channels ``(H, W, D, 4)`` and a label with all three BraTS 2021 codes."""
    rng = np.random.default_rng(0)
    channels = rng.normal(100.0, 10.0, (*SHAPE, 4)).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[3:9, 2:8, 1:5] = 2
    label[4:8, 3:7, 2:4] = 4
    label[5:7, 4:6, 2:4] = 1
    return channels, label


def test_single_4d_file_matches_file_per_channel(tmp_path, volume):
    channels, label = volume
    label_path = save(tmp_path / "seg.nii.gz", label)
    per_channel = [save(tmp_path / f"c{c}.nii.gz", channels[..., c]) for c in range(4)]
    four_d = save(tmp_path / "all.nii.gz", channels)
    from_list = load_case({"case_id": "a", "image": per_channel, "label": label_path})
    from_4d = load_case({"case_id": "a", "image": four_d, "label": label_path})
    assert tuple(from_4d["image"].shape) == (4, *SHAPE)
    assert torch.equal(from_4d["image"], from_list["image"])
    assert torch.equal(from_4d["regions"], from_list["regions"])
    np.testing.assert_allclose(from_4d["affine"].numpy(), AFFINE)
    assert from_4d["spacing"] == (2.0, 2.0, 2.5)
    assert from_4d["domain"] == "unknown"


def test_single_channel_4d_file(tmp_path, volume):
    channels, label = volume
    image = save(tmp_path / "t1.nii.gz", channels[..., :1])
    case = load_case({"case_id": "a", "image": image, "label": save(tmp_path / "seg.nii.gz", label)})
    assert tuple(case["image"].shape) == (1, *SHAPE)


def test_5d_file_rejected_with_name(tmp_path, volume):
    channels, _ = volume
    image = save(tmp_path / "vector.nii.gz", channels[:, :, :, None, :])
    with pytest.raises(ValueError) as error:
        load_case({"case_id": "a", "image": image})
    assert "vector.nii.gz" in str(error.value)
    assert "(H, W, D, C)" in str(error.value)


def test_2d_file_rejected_with_name(tmp_path, volume):
    channels, _ = volume
    image = save(tmp_path / "slice.nii.gz", channels[:, :, 0, 0])
    with pytest.raises(ValueError, match="slice.nii.gz"):
        load_case({"case_id": "a", "image": image})


def test_4d_file_in_list_rejected_with_names(tmp_path, volume):
    channels, _ = volume
    files = [save(tmp_path / "t1.nii.gz", channels[..., 0]), save(tmp_path / "rest.nii.gz", channels[..., 1:])]
    with pytest.raises(ValueError) as error:
        load_case({"case_id": "a", "image": files})
    assert "t1.nii.gz" in str(error.value)
    assert "rest.nii.gz" in str(error.value)


def test_multichannel_label_rejected_with_name(tmp_path, volume):
    channels, label = volume
    image = save(tmp_path / "all.nii.gz", channels)
    label_path = save(tmp_path / "seg2.nii.gz", np.stack([label, label], axis=-1))
    with pytest.raises(ValueError) as error:
        load_case({"case_id": "a", "image": image, "label": label_path})
    assert "seg2.nii.gz" in str(error.value)
    assert "(2, 12, 10, 6)" in str(error.value)


def test_loaded_and_prepared_tensors_are_plain(tmp_path, volume):
    # A MetaTensor in the boxes would spread into the logits and run MONAI's metadata code on every training op.
    from scripts.cases import prepare_case

    channels, label = volume
    item = {
        "case_id": "a",
        "image": save(tmp_path / "all.nii.gz", channels),
        "label": save(tmp_path / "seg.nii.gz", label),
    }
    case = load_case(item)
    for key in ("image", "brain", "regions"):
        assert type(case[key]) is torch.Tensor, key
    prepared = prepare_case(item, None, embed=False, image_channels=[0, 1, 2])
    for key, value in prepared.items():
        if isinstance(value, torch.Tensor):
            assert type(value) is torch.Tensor, key
