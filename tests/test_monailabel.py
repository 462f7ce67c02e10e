"""Every bundle served by a real MONAI Label server (monailabel 0.8.5, its ``monaibundle`` sample app).

The server runs in its own environment (``make monailabel-env``: ``.venv-monailabel``, CPU torch 2.13.0, this
repository's MONAI and medseg-nets, monailabel without its torchvision; see README "Using the bundles in MONAI
Label"), found through ``MEDSEG_MONAILABEL_PYTHON`` (``make test`` sets it) or at ``.venv-monailabel/bin/python``.
Without it the tests skip, except under CI (``CI=true``), where they fail.

One server for the module: the app copied by ``monailabel apps --download``, the four bundles copied into its
``model/`` folder with random weights as ``models/model.pt`` and small settings in their configs (MONAI Label reads
the config files as they are: SMALL below), a studies folder of generated cases (4-channel NIfTI volumes, an RGB
PNG), 127.0.0.1 on a free port; it is stopped by its PID at the end. The tests call ``/info/``,
``/infer/<model>`` for every bundle (glims_btcv on a CT study; the returned label file: shape, integer type,
values named in ``/info``, the study's affine or size) and ``/train/dalight3d`` for one epoch (``model.pt``
rewritten by the final validation).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from make_demo_data import make_case, make_ct_case  # tools/ is on sys.path (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ["dalight3d", "glims", "emcad", "eamnet", "glims_btcv"]
# absolute (the server runs in another folder), not resolved (a venv's python is a symlink that must stay one)
SERVER_PYTHON = Path(os.path.abspath(os.environ.get("MEDSEG_MONAILABEL_PYTHON", ROOT / ".venv-monailabel/bin/python")))
SHIM = ROOT / "tools/monailabel/torchvision_shim"  # torchvision stand-in: see its __init__.py
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600  # FULL_SIZE: 1800 (below)

# ids set in the copied configs (MONAI Label reads them as they are): narrow networks, small rois, no workers;
# val_interval 2 > the one training epoch: model.pt must come from the final validation (FinalValidationHandler)
SMALL = {
    "dalight3d": {"roi_size": [32, 32, 32], "sw_overlap": 0.25, "sw_batch_size": 2, "num_workers": 0, "val_interval": 2,
                  "network_def#base_channels": 8, "network_def#bottleneck_channels": 32},
    "glims": {"roi_size": [32, 32, 32], "sw_batch_size": 2, "num_workers": 0, "network_def#feature_size": 3},
    "emcad": {"roi_size": [64, 64], "slice_batch": 16, "num_workers": 0, "network_def#encoder": "pvt_v2_b0"},
    "eamnet": {"num_workers": 0},
    "glims_btcv": {"roi_size": [32, 32, 32], "sw_batch_size": 2, "num_workers": 0, "network_def#feature_size": 3},
}
# values each bundle's label map holds (BraTS 2021 values for the region networks: MONAI Label's request carries
# no brats_convention)
LABEL_VALUES = {"dalight3d": {1, 2, 3}, "glims": {1, 2, 4}, "emcad": {1, 2, 4}, "eamnet": {1},
                "glims_btcv": set(range(1, 14))}
STUDY = {"dalight3d": "brain0", "glims": "brain0", "emcad": "brain0", "glims_btcv": "ct0"}
# MEDSEG_MONAILABEL_FULL_SIZE=1 (`make monailabel-timing`): the bundles' configs as shipped and BraTS-sized studies,
# to time inference through the server for the README (minutes per 3D bundle on CPU; not part of `make test`)
FULL_SIZE = os.environ.get("MEDSEG_MONAILABEL_FULL_SIZE", "") not in ("", "0")
if FULL_SIZE:
    SMALL = {name: {} for name in SMALL}
    REQUEST_TIMEOUT_S = 1800
SIZE = (240, 240, 155) if FULL_SIZE else (32, 32, 24)
# LPS-flipped, anisotropic and translated: Orientationd/Spacingd change the grid, Invertd must bring it back
# (FULL_SIZE: BraTS's 1 mm grid, LPS-flipped)
AFFINE = np.array([[-1.2, 0, 0, 90.0], [0, -1.0, 0, 110.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])
if FULL_SIZE:
    AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
PNG_SIZE = (1024, 768) if FULL_SIZE else (90, 70)  # width, height: not the network's 256 x 256


def _server_python() -> Path:
    if SERVER_PYTHON.is_file():
        return SERVER_PYTHON
    msg = f"{SERVER_PYTHON} is absent: `make monailabel-env` installs MONAI Label's environment"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _bundle_copy(model_dir: Path, name: str) -> Path:
    """``<app>/model/<name>``: the bundle with SMALL set in its configs and random weights as models/model.pt."""
    dst = model_dir / name
    shutil.copytree(ROOT / "bundles" / name, dst, ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts"))
    for config in ("inference.json", "train.json"):
        f = dst / "configs" / config
        parser = ConfigParser()
        parser.read_config(str(f))
        for key, value in SMALL[name].items():
            if key.split("#")[0] in parser.config:  # val_interval is a train-only id
                assert parser.get(key) is not None, f"{name}/{config} has no id {key}"
                parser[key] = value
        ConfigParser.export_config_file(parser.config, str(f), indent=4)
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"] = str(dst)
    torch.manual_seed(1234)
    (dst / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), dst / "models" / "model.pt")
    return dst


def _studies(studies: Path) -> None:
    """Three 4-channel NIfTI studies (two labelled, MSD values, for dalight3d's training), a CT and an RGB PNG."""
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(3):
        image, label = make_case(np.random.default_rng(i), SIZE)
        nib.save(nib.Nifti1Image(image, AFFINE), studies / f"brain{i}.nii.gz")
        if i > 0:
            nib.save(nib.Nifti1Image(label.astype(np.uint8), AFFINE), studies / "labels" / "final" / f"brain{i}.nii.gz")
    ct, _ = make_ct_case(np.random.default_rng(0), SIZE)
    nib.save(nib.Nifti1Image(ct, AFFINE), studies / "ct0.nii.gz")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (PNG_SIZE[1], PNG_SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(studies / "skin0.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, app: Path, studies: Path) -> None:
        self.url, self.proc, self.log, self.app, self.studies = url, proc, log, app, studies

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = REQUEST_TIMEOUT_S) -> tuple[bytes, float]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read(), time.monotonic() - start
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code} {e.read()[:2000]!r}\n{self.log_tail()}") from None

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = _server_python()
    root = tmp_path_factory.mktemp("monailabel")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SHIM)]), "MASTER_ADDR": "127.0.0.1"}
    subprocess.run([str(python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                    "--output", str(root)], check=True, env=env, capture_output=True, timeout=120)
    app = root / "monaibundle"
    for name in BUNDLES:
        _bundle_copy(app / "model", name)
    studies = root / "studies"
    _studies(studies)
    port = _free_port()
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
             "--host", "127.0.0.1", "--port", str(port), "--conf", "models", ",".join(BUNDLES),
             "--conf", "sam2", "false", "--conf", "zoo_source", "github", "--conf", "preload", "false"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, app, studies)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited ({proc.returncode}) while starting:\n{srv.log_tail()}")
            try:
                srv.request("GET", "/info/", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout, AssertionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"MONAI Label server not up after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
                time.sleep(2)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)  # by its PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        try:  # a training subprocess the server started, if any is left (same session, created above)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _metadata_labels(name: str) -> dict[str, int]:
    meta = json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    return {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}


@pytest.fixture(scope="module")
def info(server):
    body, _ = server.request("GET", "/info/")
    return json.loads(body)


@pytest.mark.parametrize("name", BUNDLES)
def test_info_names_the_label_map_values(info, name):
    model = info["models"][name]
    assert model["labels"] == _metadata_labels(name)
    assert set(model["labels"].values()) == LABEL_VALUES[name]
    assert name in info["trainers"]
    # MONAI Label takes the dimension from metadata inputs.image.spatial_shape: 3 for the volume bundles, emcad
    # included (its network takes volumes and runs its 2D forward slice by slice), 2 for the photo bundle
    assert model["dimension"] == (2 if name == "eamnet" else 3)


def _infer(server: Server, name: str, image_id: str) -> tuple[bytes, float]:
    body, seconds = server.request("POST", f"/infer/{name}?image={urllib.parse.quote(image_id)}&output=image",
                                   body=urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode(),
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    print(f"MONAI Label /infer/{name} on {image_id}: {seconds:.1f} s")
    return body, seconds


@pytest.mark.parametrize("name", sorted(STUDY))
def test_infer_returns_an_integer_label_map_in_the_studys_space(server, info, name, tmp_path):
    body, _ = _infer(server, name, STUDY[name])
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    label = nib.load(out)
    data = np.asanyarray(label.dataobj)
    assert data.shape == SIZE
    assert np.issubdtype(data.dtype, np.integer), data.dtype
    assert set(np.unique(data).tolist()) <= {0} | set(info["models"][name]["labels"].values())
    np.testing.assert_allclose(label.affine, AFFINE, atol=1e-4)


def test_infer_returns_a_png_mask_of_the_input_size(server, info, tmp_path):
    body, _ = _infer(server, "eamnet", "skin0")
    mask = Image.open(io.BytesIO(body))
    assert mask.format == "PNG" and mask.mode == "L", (mask.format, mask.mode)
    assert mask.size == PNG_SIZE
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0} | set(info["models"]["eamnet"]["labels"].values())


def test_train_one_epoch_rewrites_model_pt(server):
    model_pt = server.app / "model" / "dalight3d" / "models" / "model.pt"
    before = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    body, seconds = server.request("POST", "/train/dalight3d?run_sync=true", body=json.dumps(params).encode(),
                                   headers={"Content-Type": "application/json"})
    print(f"MONAI Label /train/dalight3d, 1 epoch: {seconds:.1f} s")
    assert hashlib.sha256(model_pt.read_bytes()).hexdigest() != before, server.log_tail()
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)
