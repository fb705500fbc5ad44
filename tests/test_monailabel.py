"""MONAI Label 0.8.5 round trip: its stock bundle app serves the CalSAM bundle on 127.0.0.1 and returns a label
for a request that carries an ROI box and clicks.

The MONAI Label environment (numpy < 2, pydicom < 3) is built by ``.ci/setup_monailabel_env.sh`` outside the
repository and reused between runs; building it the first time takes 10 to 25 minutes on 2 cores.
"""

import json
import os
import shutil
import signal
import socket
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

from scripts.decoder_checkpoint import DecoderCheckpoint
from scripts.network import CalSAMNet

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "calsam_bundle"
SHAPE = (32, 36, 8)
ROI = [8, 10, 20, 24, 2, 6]  # [i0, j0, i1, j1, k0, k1], exclusive ends
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
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
    network = CalSAMNet("small", 256, None, 3, init_seed=0)
    preprocessing = {"label_convention": "brats2021", "image_channels": [3, 1, 2], "percentiles": [0.5, 99.5]}
    torch.save(DecoderCheckpoint(network, preprocessing).state_dict(), bundle / "models" / "model.pt")
    return app


def make_studies(root: Path) -> tuple[Path, np.ndarray]:
    studies = root / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (*SHAPE, 4)).astype(np.float32)
    image[10:18, 12:22, 3:5] += 80.0
    affine = np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 50], [0, 0, 2.5, -10], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), studies / "brain01.nii.gz")
    return studies, affine


def get_json(url: str) -> dict:
    with OPENER.open(url, timeout=10) as response:
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
        yield {"base": base, "info": info, "affine": affine, "log": log_path}
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
