"""Model-zoo readiness: metadata schema, network input/output check, TorchScript export and bundle packing."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from scripts.decoder_checkpoint import DecoderCheckpoint
from scripts.export import DecoderExportWrapper, check_export, example_inputs, export_decoder, trace_decoder
from scripts.network import CalSAMNet
from scripts.pack_bundle import MAX_FILE_BYTES, pack, select_files

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "calsam_bundle"
# The shared folder sits beside the repository, both on developer machines and in CI.
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"


def run_bundle_command(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(BUNDLE))
    command = [sys.executable, "-m", "monai.bundle", *arguments]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_network():
    return CalSAMNet("small", 256, None, 3, init_seed=0).eval()


def test_verify_metadata_offline(tmp_path):
    assert SCHEMA.is_file(), f"Local metadata schema missing at {SCHEMA}"
    result = run_bundle_command(
        ["verify_metadata", "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--filepath", str(SCHEMA)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_matches_network_outputs():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 + 3  # BraTS modalities plus foreground, background and ROI channels
    assert list(pred["channel_def"].values()) == ["TC", "WT", "ET"]
    assert metadata["supported_apps"] == {"monai-label": "0.8.5"}


def test_verify_net_in_out(tmp_path):
    # No model.pt under this bundle root, so network_def builds the small SAM named here with a random decoder.
    arguments = ["verify_net_in_out", "network_def", "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
                 "--config_file", str(BUNDLE / "configs" / "inference.yaml"), "--bundle_root", str(tmp_path),
                 "--network_def#variant", "small", "--network_def#image_size", "256", "--any", "8",
                 "--device", "cpu"]  # fmt: skip
    result = run_bundle_command(arguments, cwd=BUNDLE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("region, batch", [(0, 1), (2, 3)])
def test_traced_decoder_matches_pytorch(small_network, region, batch):
    traced = trace_decoder(small_network, region=region, batch=batch)
    wrapper = DecoderExportWrapper(small_network, region)
    embeddings, boxes = example_inputs(small_network, batch, seed=5)
    with torch.no_grad():
        expected = wrapper(embeddings, boxes)
        actual = traced(embeddings, boxes)
    assert actual.shape == (batch, 1, 64, 64)
    assert (actual - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0  # a constant output would make the comparison meaningless


def test_traced_decoder_depends_on_region(small_network):
    embeddings, boxes = example_inputs(small_network, 1, seed=2)
    with torch.no_grad():
        tc = trace_decoder(small_network, region=0)(embeddings, boxes)
        et = trace_decoder(small_network, region=2)(embeddings, boxes)
    assert (tc - et).abs().max() > 1e-3


def test_export_decoder_file(tmp_path, small_network):
    model_path = tmp_path / "model.pt"
    holder = DecoderCheckpoint(small_network, {"label_convention": "brats2021"}, temperature=[1.2, 1.0, 0.9])
    torch.save(holder.state_dict(), model_path)
    description = export_decoder(model_path, tmp_path / "export" / "tc.ts", region=0, batch=2)
    assert (tmp_path / "export" / "tc.ts").is_file()
    sidecar = json.loads((tmp_path / "export" / "tc.ts.json").read_text())
    assert sidecar == json.loads(json.dumps(description))
    assert sidecar["inputs"] == {"embeddings": [2, 256, 16, 16], "boxes": [2, 4]}
    assert sidecar["temperature"] == [1.2, 1.0, 0.9]
    assert sidecar["max_abs_difference"] <= 1e-4
    assert check_export(tmp_path / "export" / "tc.ts", small_network, region=0, batch=2, seed=9) <= 1e-4


def test_export_rejects_unknown_region(small_network):
    with pytest.raises(ValueError, match="region must be in 0..2"):
        DecoderExportWrapper(small_network, region=3)


def test_large_files_lists_sam_checkpoint():
    content = yaml.safe_load((BUNDLE / "large_files.yml").read_text())
    entry = content["large_files"][0]
    assert entry["path"] == "models/sam_vit_b_01ec64.pth"
    assert entry["url"] == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert entry["hash_val"] == "01ec64d29a2fca3f0661936605ae66f8"
    assert entry["hash_type"] == "md5"


def make_bundle_copy(root: Path) -> Path:
    """A copy of the bundle's shipped files plus the run products that packing must leave out."""
    bundle = root / "calsam_bundle"
    for name in ("configs", "scripts", "docs"):
        source = BUNDLE / name
        if source.is_dir():
            shutil.copytree(source, bundle / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("LICENSE", "large_files.yml"):
        (bundle / name).write_bytes((BUNDLE / name).read_bytes())
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"decoder weights")
    (bundle / "models" / "sam_vit_b_01ec64.pth").write_bytes(b"listed in large_files.yml")
    for folder in ("cache/embeddings", "eval/mlruns", "data/phantom", "models/train_state", "scripts/__pycache__"):
        (bundle / folder).mkdir(parents=True, exist_ok=True)
        (bundle / folder / "leftover.bin").write_bytes(b"x")
    (bundle / ".DS_Store").write_bytes(b"x")
    return bundle


def test_pack_bundle_contents(tmp_path):
    bundle = make_bundle_copy(tmp_path / "source")
    archive = pack(bundle, tmp_path / "dist", make_zip=True)
    packed = tmp_path / "dist" / "calsam_bundle"
    files = {str(path.relative_to(packed)) for path in packed.rglob("*") if path.is_file()}
    for required in ("LICENSE", "docs/README.md", "configs/metadata.json", "configs/inference.yaml", "large_files.yml"):
        assert required in files
    assert "models/model.pt" in files
    assert "models/sam_vit_b_01ec64.pth" not in files
    assert not any(name.split("/")[0] in {"cache", "eval", "data"} for name in files)
    assert not any(name.startswith("models/train_state/") for name in files)
    assert not any("__pycache__" in name or name.startswith(".") for name in files)
    assert max((packed / name).stat().st_size for name in files) <= MAX_FILE_BYTES

    assert (
        archive.name
        == f"calsam_bundle_v{json.loads((BUNDLE / 'configs' / 'metadata.json').read_text())['version']}.zip"
    )
    with zipfile.ZipFile(archive) as stream:
        assert {name.removeprefix("calsam_bundle/") for name in stream.namelist()} == files


def test_pack_bundle_rejects_oversized_file(tmp_path):
    bundle = make_bundle_copy(tmp_path / "source")
    with open(bundle / "models" / "extra.pt", "wb") as stream:
        stream.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match="models/extra.pt"):
        select_files(bundle)


def test_pack_bundle_requires_model_card(tmp_path):
    bundle = make_bundle_copy(tmp_path / "source")
    (bundle / "docs" / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="docs/README.md"):
        select_files(bundle)


def test_pack_bundle_command(tmp_path):
    bundle = make_bundle_copy(tmp_path / "source")
    script = BUNDLE / "scripts" / "pack_bundle.py"
    result = subprocess.run(
        [sys.executable, str(script), "--bundle", str(bundle), "--output", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dist" / "calsam_bundle" / "LICENSE").is_file()
