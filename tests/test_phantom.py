"""Tests of the MNI phantom generator, at 2 mm with at most two subjects per domain to keep the file fast."""

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.phantom import ensure_phantom, settings_hash
from scripts.phantom_anatomy import DeformationParameters, deform_template, draw_deformation
from scripts.phantom_contrasts import CONTRASTS
from scripts.phantom_lesions import ENHANCING, NECROSIS, OEDEMA, draw_lesion, render_lesion
from scripts.phantom_scanners import BIAS_MONOMIALS, bias_field, draw_acquisition
from scripts.phantom_subject import SubjectParameters, draw_subject, image_scene, render_scene, render_subject
from scripts.phantom_template import load_template_tissue

MNI_2MM_AFFINE = np.array(
    [[2.0, 0.0, 0.0, -98.0], [0.0, 2.0, 0.0, -134.0], [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    ensure_phantom(str(root), subjects_per_domain=2, resolution_mm=2, seed=0, progress=False)
    return root


def _load_datalist(root: Path) -> dict:
    return json.loads((root / "datalist.json").read_text())


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _file_times(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_datalist_layout(phantom_root):
    datalist = _load_datalist(phantom_root)
    assert datalist["labels"] == {"0": "background", "1": "necrotic core", "2": "oedema", "4": "enhancing tumour"}
    assert datalist["modality"] == ["t1", "t1ce", "t2", "flair"]
    assert datalist["numTraining"] == 4
    assert "simulated" in datalist["description"].lower()
    assert "nilearn" in datalist["phantom_parameters"]["provenance"]
    assert [entry["domain"] for entry in datalist["training"]] == ["scanner_a"] * 2 + ["scanner_b"] * 2

    subjects = {
        domain: {e["subject"] for e in datalist["training"] if e["domain"] == domain}
        for domain in ("scanner_a", "scanner_b")
    }
    assert len(subjects["scanner_a"]) == 2
    assert not subjects["scanner_a"] & subjects["scanner_b"]

    for entry in datalist["training"]:
        case_id = entry["case_id"]
        assert entry["image"] == [f"imagesTr/{case_id}_{contrast}.nii.gz" for contrast in CONTRASTS]
        assert entry["label"] == f"labelsTr/{case_id}_seg.nii.gz"
        for relative in [*entry["image"], entry["label"], entry["parameters"]]:
            assert (phantom_root / relative).is_file()


def test_volume_dtypes_and_affine(phantom_root):
    from nilearn import datasets

    template_affine = datasets.load_mni152_template(resolution=2).affine
    np.testing.assert_array_equal(template_affine, MNI_2MM_AFFINE)
    for entry in _load_datalist(phantom_root)["training"]:
        for relative, dtype in [*[(path, np.float32) for path in entry["image"]], (entry["label"], np.uint8)]:
            image = _load(phantom_root / relative)
            assert image.shape == (99, 117, 95)
            assert image.get_data_dtype() == dtype
            np.testing.assert_array_equal(image.affine, template_affine)
            assert int(image.header["qform_code"]) == 1
            assert int(image.header["sform_code"]) == 1


def test_labels_valid_and_inside_brain(phantom_root):
    for entry in _load_datalist(phantom_root)["training"]:
        label = np.asarray(_load(phantom_root / entry["label"]).dataobj)
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        assert np.count_nonzero(label == ENHANCING) > 0, "ET empty"
        assert np.count_nonzero((label == NECROSIS) | (label == ENHANCING)) > 0, "TC empty"
        assert np.count_nonzero(label == OEDEMA) > 0, "oedema empty"

        # Images are 0 outside the brain mask (skull-stripped) and Rician noise keeps them positive inside.
        t1 = np.asarray(_load(phantom_root / entry["image"][0]).dataobj)
        assert np.all(t1[label > 0] > 0)
        record = json.loads((phantom_root / entry["parameters"]).read_text())
        scene = render_scene(SubjectParameters.from_dict(record["parameters"]))
        assert not np.any((label > 0) & ~scene.anatomy.brain_mask)
        np.testing.assert_array_equal(t1 > 0, scene.anatomy.brain_mask)


def test_replay_from_recorded_parameters(phantom_root):
    entry = _load_datalist(phantom_root)["training"][-1]
    record = json.loads((phantom_root / entry["parameters"]).read_text())
    images, label, affine = render_subject(SubjectParameters.from_dict(record["parameters"]))

    np.testing.assert_array_equal(label, np.asarray(_load(phantom_root / entry["label"]).dataobj))
    for contrast, relative in zip(CONTRASTS, entry["image"]):
        np.testing.assert_array_equal(images[contrast], np.asarray(_load(phantom_root / relative).dataobj))


def test_same_seed_is_bit_identical(phantom_root, tmp_path):
    # One subject per domain: subject 0 must not depend on how many subjects the data set has.
    ensure_phantom(str(tmp_path), subjects_per_domain=1, seed=0, progress=False)
    for entry in _load_datalist(tmp_path)["training"]:
        for relative in [*entry["image"], entry["label"]]:
            first = np.asarray(_load(phantom_root / relative).dataobj)
            second = np.asarray(_load(tmp_path / relative).dataobj)
            np.testing.assert_array_equal(first, second)


def test_scanners_differ_but_labels_match():
    params = draw_subject(seed=0, domain="scanner_a", index=0)
    params_b = dataclasses.replace(params, acquisition=draw_acquisition(np.random.default_rng(7), "scanner_b"))
    images_a, label_a, _ = render_subject(params)
    images_b, label_b, _ = render_subject(params_b)
    np.testing.assert_array_equal(label_a, label_b)

    scene = render_scene(params)
    brain = scene.anatomy.brain_mask
    white = (scene.anatomy.white_matter > 0.9) & (label_a == 0)
    for contrast in CONTRASTS:
        # Raw scale: scanner B stores less than 60 % of scanner A's mean brain intensity.
        assert images_b[contrast][brain].mean() < 0.6 * images_a[contrast][brain].mean()

    # Scale-free differences: weaker enhancement and noisier, shaded white matter on scanner B.
    def enhancement(images):
        return images["t1ce"][label_a == ENHANCING].mean() / images["t1ce"][white].mean()

    def white_matter_variation(images):
        return images["t1"][white].std() / images["t1"][white].mean()

    assert enhancement(images_a) - enhancement(images_b) > 0.2
    assert white_matter_variation(images_b) > 1.5 * white_matter_variation(images_a)


def test_contrasts_follow_tissue_and_lesion_order():
    scene = render_scene(draw_subject(seed=0, domain="scanner_b", index=1))
    anatomy, label = scene.anatomy, scene.lesion.label
    healthy = label == 0
    regions = {
        "csf": (anatomy.csf > 0.95) & healthy,
        "grey": (anatomy.grey_matter > 0.9) & healthy,
        "white": (anatomy.white_matter > 0.95) & healthy,
        "necrosis": label == NECROSIS,
        "enhancing": label == ENHANCING,
        "oedema": label == OEDEMA,
    }

    def mean(contrast, region):
        signal = scene.healthy[contrast] + scene.lesion_difference[contrast]
        return float(signal[regions[region]].mean())

    assert mean("t1", "white") > mean("t1", "grey") > mean("t1", "csf")
    assert mean("t2", "csf") > mean("t2", "grey") > mean("t2", "white")
    assert mean("flair", "grey") > mean("flair", "white") > mean("flair", "csf")
    assert mean("t1ce", "enhancing") > 1.3 * mean("t1ce", "white")
    assert mean("t1ce", "necrosis") < mean("t1ce", "grey")
    assert mean("t2", "oedema") > 1.5 * mean("t2", "white")
    assert mean("flair", "oedema") > 1.5 * mean("flair", "white")


def test_lesion_draws_fit_the_brain():
    template = load_template_tissue(2)
    anatomy = deform_template(template, draw_deformation(np.random.default_rng(0), template))
    voxel_mm3 = 8.0
    for index in range(12):
        params = draw_lesion(np.random.default_rng([5, index]), anatomy)
        label = render_lesion(params, anatomy).label
        assert 12.0 <= params.whole_tumour_radius_mm <= 30.0
        assert not np.any((label > 0) & ~anatomy.brain_mask)
        for code in (NECROSIS, OEDEMA, ENHANCING):
            assert np.count_nonzero(label == code) > 0, f"draw {index}: label {code} empty"
        # The whole tumour is at most the volume of a ball of 2.5 times the drawn radius.
        assert np.count_nonzero(label) * voxel_mm3 < 4 / 3 * np.pi * (2.5 * params.whole_tumour_radius_mm) ** 3


def test_identity_deformation_keeps_template():
    template = load_template_tissue(2)
    drawn = draw_deformation(np.random.default_rng(0), template)
    identity = DeformationParameters(
        centre_mm=drawn.centre_mm,
        scale=[1.0, 1.0, 1.0],
        rotation_deg=[0.0, 0.0, 0.0],
        displacement_std_mm=0.0,
        control_points_mm=drawn.control_points_mm,
        displacement_mm=np.zeros_like(np.asarray(drawn.displacement_mm)).tolist(),
    )
    anatomy = deform_template(template, identity)
    np.testing.assert_array_equal(anatomy.brain_mask, template.brain_mask > 0.5)
    np.testing.assert_allclose(anatomy.grey_matter + anatomy.white_matter + anatomy.csf, anatomy.brain_mask, atol=1e-6)


def test_deformation_is_a_few_millimetres():
    template = load_template_tissue(2)
    params = draw_deformation(np.random.default_rng([0, 0, 0]), template)
    displacement = np.asarray(params.displacement_mm)
    assert 0 < np.abs(displacement).max() <= 2.5 * params.displacement_std_mm <= 7.5
    anatomy = deform_template(template, params)
    moved = np.count_nonzero(anatomy.brain_mask != (template.brain_mask > 0.5))
    assert moved > 0.01 * np.count_nonzero(template.brain_mask)


def test_bias_field_matches_direct_sum():
    coefficients = draw_acquisition(np.random.default_rng(3), "scanner_b").bias_coefficients
    shape = (5, 6, 7)
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    log_field = sum(c * x**a * y**b * z**d for c, (a, b, d) in zip(coefficients, BIAS_MONOMIALS))
    np.testing.assert_allclose(bias_field(coefficients, shape), np.exp(log_field), rtol=1e-6)
    assert len(BIAS_MONOMIALS) == 19


def test_noise_only_changes_with_its_seed():
    params = draw_subject(seed=0, domain="scanner_a", index=1)
    scene = render_scene(params)
    same = image_scene(scene, params.acquisition)
    reseeded = image_scene(scene, dataclasses.replace(params.acquisition, noise_seed=params.acquisition.noise_seed + 1))
    np.testing.assert_array_equal(image_scene(scene, params.acquisition)["flair"], same["flair"])
    difference = same["flair"] - reseeded["flair"]
    assert np.all(difference[~scene.anatomy.brain_mask] == 0)
    # A noise std of 0.02 of white matter at output scale ~1000 gives differences of tens of units, no bias.
    assert 5 < difference[scene.anatomy.brain_mask].std() < 100
    assert abs(ndimage.mean(difference, scene.anatomy.brain_mask)) < 2


def test_reuse_keeps_files(phantom_root):
    before = _file_times(phantom_root)
    path = ensure_phantom(str(phantom_root), subjects_per_domain=2, resolution_mm=2, seed=0, progress=False)
    assert path == str(phantom_root / "datalist.json")
    assert _file_times(phantom_root) == before


def test_changed_setting_regenerates(phantom_root, tmp_path):
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    first = _load_datalist(root)
    first_t1 = np.asarray(_load(root / first["training"][0]["image"][0]).dataobj)

    ensure_phantom(str(root), subjects_per_domain=1, seed=1, progress=False)
    second = _load_datalist(root)
    assert second["phantom_parameters"]["settings_hash"] != first["phantom_parameters"]["settings_hash"]
    assert second["phantom_parameters"]["seed"] == 1
    second_t1 = np.asarray(_load(root / second["training"][0]["image"][0]).dataobj)
    assert not np.array_equal(first_t1, second_t1)
    # Cases of the old settings that the new ones no longer list are deleted.
    labels = sorted(path.name for path in (root / "labelsTr").iterdir())
    assert labels == ["phantom_a000_seg.nii.gz", "phantom_b000_seg.nii.gz"]


def test_interrupted_build_is_completed(phantom_root, tmp_path):
    root = tmp_path / "phantom"
    shutil.copytree(phantom_root, root)
    # Simulate a build that stopped before the datalist and one file of case b001 were written.
    (root / "datalist.json").unlink()
    (root / "imagesTr" / "phantom_b001_t2.nii.gz").unlink()
    before = _file_times(root)

    ensure_phantom(str(root), subjects_per_domain=2, seed=0, progress=False)
    after = _file_times(root)
    assert (root / "imagesTr" / "phantom_b001_t2.nii.gz").is_file()
    assert _load_datalist(root) == _load_datalist(phantom_root)
    # The complete cases are kept as they were; only b001 is written again.
    for name, mtime in before.items():
        if "phantom_b001" not in name:
            assert after[name] == mtime, name


def test_settings_hash_is_canonical():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


@pytest.mark.parametrize(
    ("arguments", "error", "fragment"),
    [
        ({"subjects_per_domain": 0}, ValueError, "got 0"),
        ({"subjects_per_domain": -3}, ValueError, "got -3"),
        ({"subjects_per_domain": 2.5}, TypeError, "2.5"),
        ({"resolution_mm": 3}, ValueError, "got 3"),
        ({"resolution_mm": 1.5}, ValueError, "got 1.5"),
        ({"seed": -1}, ValueError, "got -1"),
    ],
)
def test_invalid_settings_raise(tmp_path, arguments, error, fragment):
    root = tmp_path / "never_created"
    with pytest.raises(error, match=fragment):
        ensure_phantom(str(root), progress=False, **arguments)
    assert not root.exists()
