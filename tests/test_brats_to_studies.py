"""tools/brats_to_studies.py: BraTS case folders -> MONAI Label studies folder, voxels and affine unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_to_studies import convert_case, find_cases  # tools/ is on sys.path (conftest.py)
from make_demo_data import make_brats_dataset

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {"2021": ["_flair", "_t1", "_t1ce", "_t2", "_seg"], "2023": ["-t2f", "-t1n", "-t1c", "-t2w", "-seg"]}


@pytest.mark.parametrize("convention", ["2021", "2023"])
def test_command_stacks_each_case_and_copies_its_label(tmp_path, convention):
    src = make_brats_dataset(tmp_path / "brats", cases=2, size=(12, 10, 8), convention=convention, test=1)
    # an oblique affine with its own codes: the study must keep it exactly
    affine = np.array([[-0.9, 0.1, 0, 10.0], [0.05, -1.1, 0, 20.0], [0, 0, 1.3, -5.0], [0, 0, 0, 1]])
    case_dirs = sorted(p for p in src.iterdir() if p.is_dir())
    for d in case_dirs:
        for f in d.glob("*.nii.gz"):
            img = nib.load(f)
            out = nib.Nifti1Image(np.asanyarray(img.dataobj), affine)
            out.set_sform(affine, 2)
            out.set_qform(affine, 1)
            nib.save(out, f)
    dst = tmp_path / "studies"
    r = subprocess.run([sys.executable, str(ROOT / "tools/brats_to_studies.py"), str(src), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 case(s), 2 with labels" in r.stdout
    for d in case_dirs:
        case = d.name
        study = nib.load(dst / f"{case}.nii.gz")
        files = [d / f"{case}{s}.nii.gz" for s in SUFFIXES[convention]]
        expected = np.stack([np.asanyarray(nib.load(f).dataobj) for f in files[:4]], axis=-1)
        data = np.asanyarray(study.dataobj)
        assert data.shape == (12, 10, 8, 4) and data.dtype == expected.dtype == np.int16
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_allclose(study.affine, affine, atol=1e-6)
        assert int(study.header["sform_code"]) == 2 and int(study.header["qform_code"]) == 1
        label = dst / "labels" / "final" / f"{case}.nii.gz"
        assert label.exists() == files[4].exists()
        if label.exists():
            assert label.read_bytes() == files[4].read_bytes()
    assert sorted(p.name for p in dst.iterdir() if p.is_file()) == sorted(f"{d.name}.nii.gz" for d in case_dirs)


def test_mismatched_affines_fail_naming_the_file(tmp_path):
    src = make_brats_dataset(tmp_path / "brats", cases=1, size=(8, 8, 8))
    case, files, seg = find_cases(src)[0]
    img = nib.load(files["t2"])
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ np.diag([2.0, 1, 1, 1])), files["t2"])
    with pytest.raises(ValueError, match=f"{files['t2'].name}: affine differs"):
        convert_case(case, files, seg, tmp_path / "studies")


def test_no_case_folder_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/brats_to_studies.py"), str(tmp_path), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no BraTS case folder" in r.stderr
