"""tools/make_demo_data.py: a valid MSD Task01-like dataset with nested, varied tumours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT
from make_demo_data import make_dataset

from medseg_nets.data import msd_datalists

SIZE = (32, 32, 24)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("demo") / "Task01_BrainTumour", cases=6, test=2, size=SIZE, seed=5)


def _cases(root: Path):
    meta = json.loads((root / "dataset.json").read_text())
    for entry in meta["training"]:
        image, label = nib.load(root / entry["image"]), nib.load(root / entry["label"])
        yield np.asarray(image.dataobj), np.asarray(label.dataobj), image, label


def test_dataset_json_is_a_valid_msd_task01(demo):
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "4D" and len(meta["modality"]) == 4
    assert {k: v for k, v in meta["labels"].items() if k != "0"} == {"1": "edema", "2": "non-enhancing tumor",
                                                                     "3": "enhancing tumour"}
    assert meta["numTraining"] == len(meta["training"]) == 6 and meta["numTest"] == len(meta["test"]) == 2
    for entry in meta["training"]:
        assert entry["image"].startswith("./imagesTr/") and entry["label"] == entry["image"].replace("imagesTr", "labelsTr")
        assert (demo / entry["image"]).is_file() and (demo / entry["label"]).is_file()
    assert all(isinstance(t, str) and (demo / t).is_file() for t in meta["test"])
    lists = msd_datalists(str(demo), val_fraction=0.5, seed=0, num_channels=4)  # the bundles' reader accepts it
    assert len(lists["training"]) == 3 and len(lists["validation"]) == 3 and len(lists["test"]) == 2


def test_images_have_four_finite_channels_and_labels_match(demo):
    for image, label, img, lab in _cases(demo):
        assert image.shape == SIZE + (4,) and image.dtype == np.float32 and np.isfinite(image).all()
        assert label.shape == SIZE and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1, 2, 3}  # every case has all three tumour labels
        np.testing.assert_array_equal(img.affine, lab.affine)
        brain = image.any(-1)
        assert not (label > 0)[~brain].any()  # tumour only inside the brain
        for c in range(4):  # each channel has its own intensity range and some contrast inside the brain
            assert image[..., c][brain].std() > 0.05 * image[..., c][brain].mean() > 0
    for name in json.loads((demo / "dataset.json").read_text())["test"]:
        assert nib.load(demo / name).shape == SIZE + (4,)


def test_labels_nest_as_brats_regions(demo):
    """WT = {1,2,3} encloses TC = {2,3}, which holds ET = {3} as a rim around the core {2}: the tumour core is
    surrounded by edema, not by healthy tissue, and the enhancing rim lies between core and edema."""
    around_core = []
    for image, label, _, _ in _cases(demo):
        brain = image.any(-1)
        wt, tc = label > 0, np.isin(label, [2, 3])
        shell = ndimage.binary_dilation(tc) & ~tc & brain  # voxels just outside the tumour core
        assert (label[shell] == 1).mean() > 0.95, "tumour core should be surrounded by edema"
        core_shell = ndimage.binary_dilation(label == 2) & (label != 2) & brain
        assert (label[core_shell] == 3).any(), "the enhancing rim should touch the necrotic core"
        around_core.append(label[core_shell] == 3)
        assert wt.sum() > tc.sum() > (label == 3).sum() > 0
    # the rim is only 1-2 voxels thick at this size, so the core touches edema here and there, but mostly the rim
    assert np.concatenate(around_core).mean() > 0.5


def test_tumours_vary_in_position_size_and_appearance(demo):
    centres, volumes, means = [], [], []
    for image, label, _, _ in _cases(demo):
        wt = label > 0
        centres.append(ndimage.center_of_mass(wt))
        volumes.append(int(wt.sum()))
        means.append(image[wt].mean(0) / image[image.any(-1)].mean(0))  # tumour contrast per channel
    centres = np.array(centres)
    assert np.linalg.norm(centres - centres.mean(0), axis=1).max() > 4  # not all in one place (voxels)
    assert centres.std(0).max() > 2
    assert max(volumes) > 1.5 * min(volumes)
    assert len(set(volumes)) == len(volumes)
    assert np.ptp(np.array(means), axis=0).max() > 0.05


def test_generation_is_seeded_and_the_script_runs(tmp_path):
    a = make_dataset(tmp_path / "a", cases=1, test=0, size=(16, 16, 12), seed=1)
    b = make_dataset(tmp_path / "b", cases=1, test=0, size=(16, 16, 12), seed=1)
    c = make_dataset(tmp_path / "c", cases=1, test=0, size=(16, 16, 12), seed=2)
    name = "imagesTr/BRATS_001.nii.gz"
    arr = [np.asarray(nib.load(d / name).dataobj) for d in (a, b, c)]
    np.testing.assert_array_equal(arr[0], arr[1])
    assert not np.array_equal(arr[0], arr[2])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--out", str(tmp_path / "cli"), "--cases", "1",
         "--test", "1", "--size", "16", "16", "12", "--spacing", "1.5", "1.5", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    img = nib.load(tmp_path / "cli" / name)
    assert img.shape == (16, 16, 12, 4) and img.header.get_zooms()[:3] == (1.5, 1.5, 2.0)
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["numTest"] == 1
