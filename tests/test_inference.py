"""Inference outputs: label codes, geometry of every output, prompt handling, failures and the bundle command."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.transform import Rotation
from torch import nn

from scripts.decoder_checkpoint import DecoderCheckpoint
from scripts.inference import CaseInference, find_inputs
from scripts.label_codes import ProbabilitiesToLabeld, paint_order, regions_to_label
from scripts.monailabel_prompts import AddPromptChannelsd
from scripts.network import CalSAMNet
from scripts.prompt_files import SlicePrompt, check_prompts, prompts_from_clicks, read_prompt_file
from scripts.prompts import box_masks
from scripts.regions import get_convention, label_to_regions
from scripts.volume_network import CalSAMVolumeNet, prompts_from_channels
from scripts.volume_prediction import bernoulli_entropy

BUNDLE = Path(__file__).resolve().parents[1] / "calsam_bundle"
SHAPE = (18, 22, 10)  # H, W, D: unequal sides so a transposed output cannot pass.


class BoxOracleNet(nn.Module):
    """Stand-in for CalSAMNet whose logits are +10 inside each box prompt and -10 elsewhere.

    It makes the expected output of a box prompt exact, so the tests check the inference geometry rather than
    a trained model.
    """

    def __init__(self, num_regions: int = 3) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.num_regions = num_regions
        self.image_size = 256
        self.settings = {"variant": "box-oracle", "num_regions": num_regions}
        self.encoder_sha256 = "0" * 64

    def encode(self, slices: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        return torch.zeros((slices.shape[0], 256, 2, 2))

    def forward(self, embeddings, regions, boxes=None, points=None, point_labels=None, native_hw=None):
        p = embeddings.shape[0]
        h, w = native_hw
        if boxes is None:
            return torch.full((p, 1, h, w), -10.0)
        inside = box_masks(boxes, torch.ones(p, dtype=torch.bool), (h, w))
        return torch.where(inside, 10.0, -10.0).unsqueeze(1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    network = CalSAMNet("small", 256, None, 3, init_seed=0)
    preprocessing = {"label_convention": "brats2021", "image_channels": [3, 1, 2], "percentiles": [0.5, 99.5]}
    path = folder / "model.pt"
    torch.save(DecoderCheckpoint(network, preprocessing, temperature=[1.5, 1.0, 2.0]).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def oracle_network(model_path):
    volume_network = CalSAMVolumeNet(str(model_path))
    volume_network.network = BoxOracleNet()
    return volume_network


def nested_cuboid_label(dtype=np.int16) -> np.ndarray:
    """BraTS 2021 codes in nested cuboids at an off-centre position: oedema 2 around core 1 around rim 4."""
    label = np.zeros(SHAPE, dtype=dtype)
    label[3:14, 5:19, 2:8] = 2
    label[5:12, 7:15, 3:7] = 1
    label[6:10, 9:12, 4:6] = 4
    return label


def write_nifti(data: np.ndarray, affine: np.ndarray, path: Path, qform_code: int, sform_code: int) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, path)
    return path


def write_case(folder: Path, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1) -> dict:
    rng = np.random.default_rng(0)
    label = nested_cuboid_label()
    contrast = np.select([label == 4, label == 1, label == 2], [3.0, 0.5, 2.0], 1.0)
    image = np.stack([contrast * (100 + 10 * c) + rng.normal(0, 2, SHAPE) for c in range(4)], axis=-1)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "case_id": "case",
        "image": str(write_nifti(image.astype(np.float32), affine, folder / "case.nii.gz", qform_code, sform_code)),
        "label": str(write_nifti(label, affine, folder / "case_seg.nii.gz", qform_code, sform_code)),
    }


def rotated_permuted_affine() -> np.ndarray:
    rotation = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    permutation = np.eye(3)[:, [2, 0, 1]]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag([1.5, 2.0, 2.5])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    return affine


AFFINES = {
    "ras": (np.diag([2.0, 2.0, 2.0, 1.0]), 1, 1),
    "lps": (np.array([[-1.0, 0, 0, 90], [0, -1.2, 0, 110], [0, 0, 3.0, -60], [0, 0, 0, 1]]), 1, 1),
    "rotated_permuted": (rotated_permuted_affine(), 1, 2),
    "sform_only": (rotated_permuted_affine(), 0, 4),
    "qform_only": (rotated_permuted_affine(), 2, 0),
}


def test_paint_order_brats2021():
    assert paint_order(get_convention("brats2021")) == [(1, 2), (0, 1), (2, 4)]


@pytest.mark.parametrize("name", ["brats2021", "brats2023", "binary"])
def test_label_codes_round_trip(name):
    convention = get_convention(name)
    codes = np.array(sorted(convention.codes), dtype=np.int16)
    label = torch.as_tensor(np.random.default_rng(1).choice(codes, size=(9, 8, 7)))
    rebuilt = regions_to_label(label_to_regions(label, convention), convention, dtype=torch.int16)
    assert rebuilt.dtype == torch.int16
    assert torch.equal(rebuilt, label)


def test_label_codes_non_nested_prediction():
    regions = torch.zeros((3, 1, 1, 3), dtype=torch.bool)
    regions[2, 0, 0, 0] = True  # ET alone, outside TC and WT
    regions[0, 0, 0, 1] = True  # TC alone
    regions[1, 0, 0, 2] = True  # WT alone
    label = regions_to_label(regions, get_convention("brats2021"))
    assert label.flatten().tolist() == [4, 1, 2]


def test_probabilities_to_label_threshold():
    prob = torch.zeros((3, 2, 1, 1))
    prob[1, 0] = 0.5  # exactly at the threshold: inside WT
    prob[1, 1] = 0.49
    output = ProbabilitiesToLabeld("pred", "brats2021")({"pred": prob})["pred"]
    assert output.shape == (1, 2, 1, 1)
    assert output.flatten().tolist() == [2, 0]


def test_bernoulli_entropy_values():
    prob = torch.tensor([0.0, 1.0, 0.5, 0.2])
    entropy = bernoulli_entropy(prob)
    expected = [0.0, 0.0, math.log(2), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    assert entropy.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_label_mode_keeps_geometry(tmp_path, oracle_network, model_path, name):
    affine, qform_code, sform_code = AFFINES[name]
    item = write_case(tmp_path / "input", affine, qform_code, sform_code)
    runner = CaseInference(oracle_network, tmp_path / "out", "label", model_path)
    sidecar = runner.run_case(item)

    source = nib.load(item["image"])
    label = nib.load(item["label"])
    for key in ("segmentation", "probabilities", "uncertainty"):
        output = nib.load(tmp_path / "out" / sidecar["outputs"][key])
        assert output.shape[:3] == SHAPE
        np.testing.assert_allclose(output.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(output.header.get_sform(), source.header.get_sform(), atol=1e-5)
        np.testing.assert_allclose(output.header.get_qform(), source.header.get_qform(), atol=1e-5)
        assert int(output.header["qform_code"]) == qform_code
        assert int(output.header["sform_code"]) == sform_code
        np.testing.assert_allclose(output.header.get_zooms()[:3], source.header.get_zooms()[:3], atol=1e-6)

    segmentation = nib.load(tmp_path / "out" / sidecar["outputs"]["segmentation"])
    assert segmentation.get_data_dtype() == label.get_data_dtype()
    np.testing.assert_array_equal(np.asanyarray(segmentation.dataobj), np.asanyarray(label.dataobj))

    prob = nib.load(tmp_path / "out" / sidecar["outputs"]["probabilities"]).get_fdata()
    assert prob.shape == (*SHAPE, 3)
    assert prob[7, 10, 4, 2] > 0.99  # an enhancing-rim voxel, ET channel
    assert prob[1, 1, 4, 1] < 0.01  # outside every box on a prompted slice
    assert prob[7, 10, 9, 1] == 0.0  # a slice without a lesion is not decoded
    entropy = nib.load(tmp_path / "out" / sidecar["outputs"]["uncertainty"]).get_fdata()
    assert entropy.shape == (*SHAPE, 3)
    assert entropy.max() <= math.log(2) + 1e-6
    assert sidecar["decoded_slices"]["ET"] == [4, 5]
    assert sidecar["mode"] == "label"


def test_prompt_file_mode_sidecar(tmp_path, oracle_network, model_path):
    item = write_case(tmp_path / "input", np.diag([2.0, 2.0, 2.0, 1.0]))
    prompts = {"case": {"3": {"WT": {"box": [4, 2, 9, 6]}}}}
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    runner = CaseInference(oracle_network, tmp_path / "out", "prompt_file", model_path, prompt_file=prompt_file)
    summary = runner.run([item])
    assert summary["completed"] == ["case"]

    sidecar = json.loads((tmp_path / "out" / "case.json").read_text())
    assert sidecar["mode"] == "prompt_file"
    assert sidecar["prompt_source"] == str(prompt_file)
    assert sidecar["model"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert sidecar["temperature"] == [1.5, 1.0, 2.0]
    assert sidecar["temperature_applied"] is True
    assert sidecar["decoded_slices"] == {"TC": [], "WT": [3], "ET": []}

    segmentation = np.asanyarray(nib.load(tmp_path / "out" / "case_seg.nii.gz").dataobj)
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[2:6, 4:9, 3] = 2  # box x0=4..x1=9 along W, y0=2..y1=6 along H
    np.testing.assert_array_equal(segmentation, expected)
    assert segmentation.dtype == np.uint8


def test_unreadable_case_is_skipped(tmp_path, oracle_network, model_path):
    good = write_case(tmp_path / "input", np.diag([2.0, 2.0, 2.0, 1.0]))
    broken = tmp_path / "input" / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    items = [{"case_id": "broken", "image": str(broken)}, dict(good, case_id="good")]
    runner = CaseInference(oracle_network, tmp_path / "out", "automatic", model_path)
    summary = runner.run(items)
    assert summary["completed"] == ["good"]
    assert [entry["case_id"] for entry in summary["failed"]] == ["broken"]
    assert "broken.nii.gz" in json.dumps(summary["failed"])
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == [
        "good.json",
        "good_entropy.nii.gz",
        "good_prob.nii.gz",
        "good_seg.nii.gz",
        "inference_summary.json",
    ]


def test_case_missing_from_prompt_file_fails_alone(tmp_path, oracle_network, model_path):
    item = write_case(tmp_path / "input", np.diag([2.0, 2.0, 2.0, 1.0]))
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps({"other": {"0": {"*": {"box": [0, 0, 2, 2]}}}}))
    runner = CaseInference(oracle_network, tmp_path / "out", "prompt_file", model_path, prompt_file=prompt_file)
    summary = runner.run([item])
    assert summary["completed"] == []
    assert "no prompts for case 'case'" in summary["failed"][0]["error"]


def test_prompt_file_format(tmp_path):
    prompt_file = tmp_path / "prompts.json"
    content = {"c1": {"4": {"*": {"points": [[3, 2], [5, 6]], "point_labels": [1, 0]}, "ET": {"box": [1, 2, 3, 4]}}}}
    prompt_file.write_text(json.dumps(content))
    prompts = read_prompt_file(prompt_file, ("TC", "WT", "ET"))["c1"]
    points_only = [p for p in prompts if p.kind == "points"]
    assert [p.region for p in points_only] == [0, 1, 2]
    assert points_only[0].points == ((3.0, 2.0), (5.0, 6.0))
    assert points_only[0].point_labels == (1, 0)
    boxed = [p for p in prompts if p.kind == "box"]
    assert boxed == [SlicePrompt(4, 2, (1.0, 2.0, 3.0, 4.0))]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"c1": {"4": {"XX": {"box": [1, 2, 3, 4]}}}}, "unknown region 'XX'"),
        ({"c1": {"four": {"TC": {"box": [1, 2, 3, 4]}}}}, "slice keys are integer"),
        ({"c1": {"4": {"TC": {"box": [1, 2, 3]}}}}, "a box is [x0, y0, x1, y1]"),
        ({"c1": {"4": {"TC": {"points": [[1, 2]], "point_labels": [1, 0]}}}}, "one point label each"),
    ],
)
def test_prompt_file_rejects_bad_entries(tmp_path, entry, message):
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(entry))
    with pytest.raises(ValueError, match="prompts.json") as raised:
        read_prompt_file(prompt_file, ("TC", "WT", "ET"))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (SlicePrompt(10, 0, (0, 0, 2, 2)), "slice index outside"),
        (SlicePrompt(1, 0, (0, 0, 23, 2)), "must satisfy"),
        (SlicePrompt(1, 0, (5, 0, 5, 2)), "must satisfy"),
        (SlicePrompt(1, 0, None, ((22.0, 1.0),), (1,)), "must lie in"),
        (SlicePrompt(1, 3, (0, 0, 2, 2)), "region index outside"),
    ],
)
def test_check_prompts_rejects_outside_volume(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompts([prompt], SHAPE, 3, "case x")


def test_clicks_and_roi_to_prompts():
    prompts = prompts_from_clicks([[4, 6, 2]], [[1, 1, 5]], [3, 5, 8, 10, 2, 4], num_regions=1)
    by_slice = {p.slice_index: p for p in prompts}
    assert sorted(by_slice) == [2, 3, 5]
    assert by_slice[2].box == (5.0, 3.0, 10.0, 8.0)
    assert by_slice[2].points == ((6.0, 4.0),)
    assert by_slice[2].point_labels == (1,)
    assert by_slice[3].kind == "box"
    assert by_slice[5].kind == "points"
    assert by_slice[5].point_labels == (0,)


def test_prompt_channels_carry_clicks_and_roi():
    request = {"image": torch.rand(2, *SHAPE), "foreground": [[4, 6, 2]], "background": [[1, 1, 5]]}
    request["roi"] = [3, 5, 8, 10, 2, 4]
    image = AddPromptChannelsd("image")(request)["image"]
    assert image.shape == (5, *SHAPE)
    assert image[4].sum() == 5 * 5 * 2
    recovered = prompts_from_channels(image[2:] >= 0.5, 3)
    assert recovered == prompts_from_clicks(request["foreground"], request["background"], request["roi"], 3)


def test_prompt_channels_reject_click_outside():
    request = {"image": torch.rand(1, *SHAPE), "foreground": [[18, 0, 0]]}
    with pytest.raises(ValueError, match="'foreground'"):
        AddPromptChannelsd("image")(request)


def test_temperature_divides_logits(tmp_path, model_path):
    item = write_case(tmp_path / "input", np.diag([2.0, 2.0, 2.0, 1.0]))
    image = torch.as_tensor(np.moveaxis(nib.load(item["image"]).get_fdata(dtype=np.float32), -1, 0))
    prompts = [SlicePrompt(4, k, (8.0, 5.0, 16.0, 13.0), ((10.0, 7.0),), (1,)) for k in range(3)]
    scaled = CalSAMVolumeNet(str(model_path)).predict(image, prompts)["prob"][..., 4]
    plain = CalSAMVolumeNet(str(model_path), apply_temperature=False).predict(image, prompts)["prob"][..., 4]
    logit = torch.logit(plain.double().clamp(1e-6, 1 - 1e-6))
    expected = torch.sigmoid(logit / torch.tensor([1.5, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1))
    torch.testing.assert_close(scaled.double(), expected, atol=2e-4, rtol=0)


def test_volume_network_forward_channels(model_path):
    network = CalSAMVolumeNet(str(model_path))
    x = torch.zeros((1, 4 + 3, *SHAPE))
    x[0, :4, 2:16, 3:20, 1:9] = 1.0
    x[0, 4, 7, 10, 4] = 1.0  # one foreground click on slice 4
    output = network(x)
    assert output.shape == (1, 3, *SHAPE)
    assert output.dtype == torch.float32
    decoded = output[0].flatten(1, 2).amax(dim=1) > 0  # (K, D): slices with a non-zero probability
    assert decoded.any(dim=0).nonzero().flatten().tolist() == [4]


def test_find_inputs_folder_and_datalist(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert [item["case_id"] for item in find_inputs(tmp_path)] == ["a", "b"]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": ["imgs/x.nii.gz", {"image": ["c0.nii", "c1.nii"], "case_id": "y"}]}))
    items = find_inputs(datalist)
    assert items[0] == {"image": str(tmp_path / "imgs" / "x.nii.gz"), "case_id": "x"}
    assert items[1]["image"] == [str(tmp_path / "c0.nii"), str(tmp_path / "c1.nii")]
    with pytest.raises(ValueError, match="no section 'validation'"):
        find_inputs(datalist, "validation")


def test_bundle_inference_command(tmp_path, model_path):
    bundle_root = tmp_path / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").write_bytes(model_path.read_bytes())
    inputs = tmp_path / "inputs"
    affine, qform_code, sform_code = AFFINES["lps"]
    write_case(inputs, affine, qform_code, sform_code)
    (inputs / "case_seg.nii.gz").unlink()
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    override = {"bundle_root": str(bundle_root), "input_path": str(inputs), "prompt_mode": "automatic"}
    override_path = tmp_path / "override.yaml"
    override_path.write_text(yaml.safe_dump(override))
    configs = [str(BUNDLE / "configs" / "inference.yaml"), str(override_path)]
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(configs),
               "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
               "--logging_file", str(BUNDLE / "configs" / "logging.conf")]  # fmt: skip
    environment = dict(os.environ, PYTHONPATH=str(BUNDLE))
    result = subprocess.run(command, cwd=BUNDLE, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    output_dir = bundle_root / "eval" / "inference"
    summary = json.loads((output_dir / "inference_summary.json").read_text())
    assert summary["completed"] == ["case"]
    assert [entry["case_id"] for entry in summary["failed"]] == ["broken"]
    assert "broken" in result.stdout + result.stderr
    sidecar = json.loads((output_dir / "case.json").read_text())
    assert sidecar["mode"] == "automatic"
    assert sidecar["decoded_slices"]["TC"] == list(range(SHAPE[2]))
    segmentation = nib.load(output_dir / "case_seg.nii.gz")
    np.testing.assert_allclose(segmentation.affine, affine, atol=1e-5)
    assert set(np.unique(np.asanyarray(segmentation.dataobj))) <= {0, 1, 2, 4}
    prob = nib.load(output_dir / "case_prob.nii.gz").get_fdata()
    assert prob.shape == (*SHAPE, 3)
    assert prob.min() >= 0.0
    assert prob.max() <= 1.0


def test_volume_network_restricts_to_roi(model_path):
    network = CalSAMVolumeNet(str(model_path))
    x = torch.zeros((1, 4 + 3, *SHAPE))
    x[0, :4, 2:16, 3:20, 1:9] = 1.0
    x[0, 6, 4:12, 6:16, 3:6] = 1.0  # ROI rows 4..11, columns 6..15, slices 3..5
    x[0, 4, 7, 10, 8] = 1.0  # a click on slice 8, outside the ROI slices
    output = network(x)[0]
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[4:12, 6:16, 3:6] = True
    assert output[:, ~inside].abs().max() == 0.0
    assert output[:, inside].max() > 0.0
