"""MONAI Label 0.8.5 round trips: its stock bundle app serves the CalSAM bundle on 127.0.0.1, returns a label
for a request that carries an ROI box and clicks, and fine-tunes the decoder through its training task.

The MONAI Label environment (numpy < 2, pydicom < 3) is built by ``.ci/setup_monailabel_env.sh`` outside the
repository and reused between runs; building it the first time took 2 to 25 minutes on 2 cores, depending on load.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from scripts.decoder_checkpoint import DecoderCheckpoint, load_network
from scripts.network import CalSAMNet

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "calsam_bundle"
SHAPE = (32, 36, 8)
ROI = [8, 10, 20, 24, 2, 6]  # [i0, j0, i1, j1, k0, k1], exclusive ends
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
TRAINING_TIMEOUT_S = 900
# The app's network: the small SAM with random weights at 256 px, which trains in seconds on a CPU.
NETWORK = {"variant": "small", "image_size": 256, "num_regions": 3, "init_seed": 0}
# Studies with a label, for the training task. MONAI Label trains only on images with a label in labels/final.
LABELLED = ("brain02", "brain03")
# Requests go to 127.0.0.1 only; an http_proxy variable in the environment must not redirect them.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def monailabel_env():
    setup = subprocess.run(
        ["bash", str(REPO / ".ci" / "setup_monailabel_env.sh")], capture_output=True, text=True, timeout=3600
    )
    if setup.returncode != 0:
        pytest.fail(f"Creating the MONAI Label environment failed:\n{setup.stderr[-6000:]}\n{setup.stdout[-2000:]}")
    return Path(setup.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_app(env: Path, root: Path) -> Path:
    """Copy the stock bundle app and place the bundle, with a random small model.pt, in its model folder."""
    app = root / "app"
    shutil.copytree(env / "monailabel" / "sample-apps" / "monaibundle", app)
    bundle = app / "model" / "calsam_bundle"
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(BUNDLE / name, bundle / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(BUNDLE / "LICENSE", bundle / "LICENSE")
    (bundle / "models").mkdir()
    network = CalSAMNet(NETWORK["variant"], NETWORK["image_size"], None, NETWORK["num_regions"], NETWORK["init_seed"])
    preprocessing = {"label_convention": "brats2021", "image_channels": [3, 1, 2], "percentiles": [0.5, 99.5]}
    torch.save(DecoderCheckpoint(network, preprocessing).state_dict(), bundle / "models" / "model.pt")

    # MONAI Label trains with the app's configs/train.yaml alone, so its network must match model.pt.
    train_yaml = bundle / "configs" / "train.yaml"
    recipe = yaml.safe_load(train_yaml.read_text())
    recipe.update(
        sam_variant=NETWORK["variant"], sam_image_size=NETWORK["image_size"], sam_checkpoint=None, network_seed=0
    )
    train_yaml.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return app


def make_studies(root: Path) -> tuple[Path, np.ndarray]:
    """Write an unlabelled volume for inference and two labelled ones for training, each ``(H, W, D, 4)``."""
    studies = root / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (*SHAPE, 4)).astype(np.float32)
    image[10:18, 12:22, 3:5] += 80.0
    affine = np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 50], [0, 0, 2.5, -10], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), studies / "brain01.nii.gz")

    labels = studies / "labels" / "final"
    labels.mkdir(parents=True)
    for number, name in enumerate(LABELLED):
        image, label = tumour_volume(np.random.default_rng(number + 1), shift=number)
        nib.save(nib.Nifti1Image(image, affine), studies / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), labels / f"{name}.nii.gz")
    return studies, affine


def tumour_volume(rng: np.random.Generator, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy box-shaped "brain" with a lesion in BraTS codes, the modalities T1, T1ce, T2, FLAIR on axis 4.

    Oedema (2) surrounds an enhancing rim (4) around a necrotic core (1) on slices 2 to 5. As in glioma MRI,
    FLAIR is bright in the oedema, T2 in the whole lesion and T1ce in the rim, and T1 is dark in the core.
    """
    label = np.zeros(SHAPE, dtype=np.uint8)
    i, j = 10 + shift, 12 + shift
    label[i : i + 10, j : j + 12, 2:6] = 2
    label[i + 2 : i + 8, j + 2 : j + 10, 3:5] = 4
    label[i + 4 : i + 6, j + 4 : j + 8, 3:5] = 1
    image = np.zeros((*SHAPE, 4), dtype=np.float32)
    image[2:-2, 2:-2, :] = rng.normal(100.0, 5.0, (SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2], 4))
    image[..., 3][label == 2] += 80.0
    image[..., 2][label > 0] += 60.0
    image[..., 1][label == 4] += 90.0
    image[..., 0][label == 1] -= 40.0
    return image, label


def get_json(url: str) -> dict:
    with OPENER.open(url, timeout=10) as response:
        return json.loads(response.read())


def post_json(url: str, content: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(content).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with OPENER.open(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def post_form(url: str, fields: dict) -> bytes:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with OPENER.open(request, timeout=REQUEST_TIMEOUT_S) as response:
        return response.read()


@pytest.fixture(scope="module")
def server(monailabel_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    app = make_app(monailabel_env, root)
    studies, affine = make_studies(root)
    port = free_port()

    server_options = ["--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    # Offline: the bundle is local (zoo_source ngc downloads nothing for a local bundle) and SAM2 is off.
    offline = ["--conf", "models", "calsam_bundle", "--conf", "zoo_source", "ngc", "--conf", "sam2", "false"]
    command = [
        str(monailabel_env / "bin" / "python"),
        "-m",
        "monailabel.main",
        "start_server",
        *server_options,
        *offline,
    ]
    # A private HOME keeps MONAI Label's session and cache folders out of the user's home.
    environment = dict(os.environ, HOME=str(root / "home"), PYTHONPATH="")
    # MONAI's MLFlowHandler prefers MLFLOW_TRACKING_URI over the bundle's tracking_uri, and mlflow.set_tracking_uri
    # in an earlier test of this process sets it. The server must log to the bundle's tracking_uri.
    for name in [name for name in environment if name.startswith("MLFLOW_")]:
        del environment[name]

    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        info = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                info = get_json(f"{base}/info/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        if info is None:
            pytest.fail(f"MONAI Label did not start within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
        yield {"base": base, "info": info, "affine": affine, "log": log_path, "bundle": app / "model" / "calsam_bundle"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_bundle_registers_infer_and_train_tasks(server):
    info = server["info"]
    assert info["models"]["calsam_bundle"]["dimension"] == 3
    assert (
        info["models"]["calsam_bundle"]["version"]
        == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    )
    assert "calsam_bundle" in info["trainers"]
    assert "sam_2d" not in info["models"]


def test_box_and_click_request_round_trip(server, tmp_path):
    params = {"roi": ROI, "foreground": [[14, 17, 3]], "background": [[9, 11, 4]], "device": "cpu"}
    url = f"{server['base']}/infer/calsam_bundle?image=brain01&output=image"
    try:
        payload = post_form(url, {"params": json.dumps(params)})
    except urllib.error.HTTPError as error:
        pytest.fail(
            f"Inference request failed with {error.code}: {error.read()[-2000:]!r}\n{server['log'].read_text()[-4000:]}"
        )
    path = tmp_path / "label.nii.gz"
    path.write_bytes(payload)
    label = nib.load(path)
    values = np.asanyarray(label.dataobj)
    assert label.shape == SHAPE
    np.testing.assert_allclose(label.affine, server["affine"], atol=1e-5)
    assert set(np.unique(values).tolist()) <= {0, 1, 2, 4}

    i0, j0, i1, j1, k0, k1 = ROI
    inside = np.zeros(SHAPE, dtype=bool)
    inside[i0:i1, j0:j1, k0:k1] = True
    assert (values > 0).any()
    assert not (values[~inside] > 0).any()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Runs after the inference test because it replaces the model that the inference test expects to be random.
def test_training_task_writes_new_model(server):
    bundle = server["bundle"]
    model_path = bundle / "models" / "model.pt"
    sha_before = file_sha256(model_path)
    decoder_before = torch.load(model_path, map_location="cpu", weights_only=True)["mask_decoder"]

    # One epoch, one labelled image for training and one for validation, initialised from the app's model.pt.
    request = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}
    try:
        task = post_json(f"{server['base']}/train/calsam_bundle", request)
    except urllib.error.HTTPError as error:
        pytest.fail(f"Training request failed with {error.code}: {error.read()[-2000:]!r}")
    assert task["status"] in {"SUBMITTED", "RUNNING"}

    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    status = task
    while time.monotonic() < deadline:
        status = get_json(f"{server['base']}/train/")
        if status["id"] == task["id"] and status["status"] not in {"SUBMITTED", "RUNNING"}:
            break
        time.sleep(5)
    log_tail = server["log"].read_text()[-8000:]
    assert status["status"] == "DONE", f"Training task ended as {status['status']}:\n{log_tail}"

    assert file_sha256(model_path) != sha_before
    network, checkpoint = load_network(model_path)
    assert {key: network.settings[key] for key in NETWORK} == NETWORK
    decoder_after = network.sam.mask_decoder.state_dict()
    assert any(not torch.equal(decoder_before[key], decoder_after[key]) for key in decoder_before)
    assert checkpoint.preprocessing["label_convention"] == "brats2021"
    assert checkpoint.preprocessing["image_channels"] == [3, 1, 2]
    # The temperature fit after training ran on the validation image.
    assert len(checkpoint.temperature) == 3
    assert all(math.isfinite(t) and t > 0 for t in checkpoint.temperature)

    # The data profile shows MONAI Label's own split of the two labelled images and no test parts, because the
    # datalist was never read.
    with sqlite3.connect(bundle / "eval" / "mlruns.db") as database:
        params = {row[0]: row[1] for row in database.execute("SELECT key, value FROM params")}
    assert params["data/train/cases"] == "1"
    assert params["data/val/cases"] == "1"
    assert params["data/train/domains"] == "unknown"
    assert params["optim/max_epochs"] == "1"
    assert not any(key.startswith("data/test") for key in params)
