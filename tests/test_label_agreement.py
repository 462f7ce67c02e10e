"""tools/label_agreement.py: Dice per BraTS region between two folders of label maps."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import label_agreement  # tools/ is on sys.path (conftest.py)


def _save(path, label):
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), path)


def test_dice_per_region_pooled_and_lowest(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    x = np.zeros((10, 10, 4), np.uint8)
    x[2:6, 2:6, :2] = 2  # edema: WT only (16 x 2 = 32 voxels)
    x[3:5, 3:5, 0] = 4  # enhancing: TC, WT, ET (4 voxels)
    y = x.copy()
    y[3:5, 3:5, 0] = 1  # the enhancing voxels called necrotic core: TC and WT agree, ET does not
    _save(a / "c1_seg.nii.gz", x)
    _save(b / "c1_seg.nii.gz", y)
    z = np.zeros((10, 10, 4), np.uint8)
    z[0:2, 0:2, 0] = 2  # 4 voxels of WT in A, 8 in B (4 shared)
    w = z.copy()
    w[0:2, 2:4, 0] = 2
    _save(a / "c2_seg.nii.gz", z)
    _save(b / "c2_seg.nii.gz", w)
    _save(a / "only_in_a_seg.nii.gz", z)  # ignored: not in both folders
    assert label_agreement.main([str(a), str(b), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n_cases"] == 2 and set(r["cases"]) == {"c1_seg.nii.gz", "c2_seg.nii.gz"}
    assert r["cases"]["c1_seg.nii.gz"] == {"TC": 1.0, "WT": 1.0, "ET": 0.0}
    assert r["cases"]["c2_seg.nii.gz"] == pytest.approx({"TC": 1.0, "WT": 2 * 4 / 12, "ET": 1.0})  # both empty: 1
    assert r["pooled"] == pytest.approx({"TC": 1.0, "WT": 2 * (32 + 4) / (64 + 12), "ET": 0.0})
    assert r["lowest"] == pytest.approx({"TC": 1.0, "WT": 2 * 4 / 12, "ET": 0.0})
    assert "pooled" in capsys.readouterr().out


def test_no_common_file_or_shape_mismatch_is_an_error(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _save(a / "x.nii.gz", np.zeros((4, 4, 4)))
    assert label_agreement.main([str(a), str(b)]) == 1
    _save(b / "x.nii.gz", np.zeros((4, 4, 5)))
    assert label_agreement.main([str(a), str(b)]) == 1
    assert "shapes differ" in capsys.readouterr().err


def test_msd_labels(tmp_path):
    """--labels msd: 1 edema, 2 non-enhancing, 3 enhancing (dalight3d); read as BraTS 2023 they would give TC = 1 + 3."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    x = np.zeros((8, 8, 2), np.uint8)
    x[0:4, 0:4, 0] = 1  # edema: WT only (16 voxels)
    x[4:6, 4:6, 0] = 3  # enhancing: TC, WT, ET (4 voxels)
    y = x.copy()
    y[4:6, 4:6, 0] = 2  # called non-enhancing: TC and WT agree, ET does not
    _save(a / "c_seg.nii.gz", x)
    _save(b / "c_seg.nii.gz", y)
    assert label_agreement.main([str(a), str(b), "--labels", "msd", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["cases"]["c_seg.nii.gz"] == {"TC": 1.0, "WT": 1.0, "ET": 0.0}
    assert label_agreement.main([str(a), str(b), "--json", str(tmp_path / "r2.json")]) == 0  # as BraTS 2023
    assert json.loads((tmp_path / "r2.json").read_text())["cases"]["c_seg.nii.gz"]["TC"] < 1.0
