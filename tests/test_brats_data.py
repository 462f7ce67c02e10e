"""BraTS folders: datalists, checks with clear errors, label conventions and region conversions (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImaged

from conftest import ROOT  # noqa: F401  (puts tools/ on sys.path)
from make_demo_data import make_brats_dataset, make_ct_dataset

from medseg_nets import InputDataError
from medseg_nets.data import brats_case_name, brats_datalists, brats_name_formatter, msd_datalists
from medseg_nets.transforms import (
    BraTSLabelToRegionsd,
    RegionsToBraTSLabeld,
    brats_label_to_regions,
    brats_regions_to_label,
    detect_brats_convention,
)

SIZE = (12, 10, 8)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """3 labelled BraTS 2021 cases, 2 labelled BraTS 2023 cases and 1 unlabelled 2020 case (.nii) in sub-folders."""
    root = tmp_path_factory.mktemp("brats_mixed")
    make_brats_dataset(root / "2021", cases=3, size=SIZE, seed=1, convention="2021")
    make_brats_dataset(root / "2023", cases=2, size=SIZE, seed=2, convention="2023")
    make_brats_dataset(root / "2020", cases=0, test=1, size=SIZE, seed=3, convention="2020")
    case = root / "2020" / "BraTS20_Training_001"
    for f in case.glob("*.nii.gz"):  # BraTS 2020 was also distributed uncompressed
        nib.save(nib.load(f), case / f.name.replace(".nii.gz", ".nii"))
        f.unlink()
    return root


def test_generator_writes_the_challenge_layouts(mixed_dir):
    seg21 = mixed_dir / "2021" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    seg23 = mixed_dir / "2023" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz"
    assert set(np.unique(np.asarray(nib.load(seg21).dataobj))) <= {0, 1, 2, 4}
    assert set(np.unique(np.asarray(nib.load(seg23).dataobj))) <= {0, 1, 2, 3}
    for suffix in ("t2f", "t1n", "t1c", "t2w"):
        assert (seg23.parent / f"BraTS-GLI-00000-000-{suffix}.nii.gz").is_file()
    assert sorted(p.name for p in (mixed_dir / "2020" / "BraTS20_Training_001").iterdir()) == [
        f"BraTS20_Training_001_{m}.nii" for m in ("flair", "t1", "t1ce", "t2")]


def test_datalists_namings_conventions_order_and_split(mixed_dir, tmp_path):
    lists = brats_datalists(str(mixed_dir), str(tmp_path), val_fraction=0.4, seed=3, require_labels=False)
    labelled = lists["training"] + lists["validation"]
    assert len(lists["training"]) == 3 and len(lists["validation"]) == 2
    assert {x["case"] for x in labelled} == {"BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002",
                                               "BraTS-GLI-00000-000", "BraTS-GLI-00001-000"}
    for item in labelled:
        expected = "2023" if item["case"].startswith("BraTS-GLI") else "2021"
        assert item["brats_convention"] == expected
        names = [Path(p).name for p in item["image"]]  # fixed order FLAIR, T1, T1ce, T2
        suffixes = ["-t2f", "-t1n", "-t1c", "-t2w"] if expected == "2023" else ["_flair", "_t1", "_t1ce", "_t2"]
        assert names == [f"{item['case']}{s}.nii.gz" for s in suffixes]
        assert Path(item["label"]).name.startswith(item["case"]) and Path(item["label"]).is_file()
    # unlabelled cases are the test list; .nii files are found too
    assert [x["case"] for x in lists["test"]] == ["BraTS20_Training_001"]
    assert lists["test"][0]["brats_convention"] == "2021" and "label" not in lists["test"][0]
    # the split is seeded, repeatable and written to the output folder
    again = brats_datalists(str(mixed_dir), None, val_fraction=0.4, seed=3, require_labels=False)
    assert again == lists
    record = json.loads((tmp_path / "datalist_split.json").read_text())
    assert record["seed"] == 3 and record["validation"] == lists["validation"]
    # a forced convention applies to every case
    forced = brats_datalists(str(mixed_dir), None, label_convention="2023", require_labels=False)
    assert {x["brats_convention"] for x in forced["training"] + forced["test"]} == {"2023"}


def test_test_list_falls_back_to_validation_and_output_dir_is_not_scanned(tmp_path):
    root = make_brats_dataset(tmp_path / "data", cases=3, size=SIZE, convention="2021")
    out = root / "eval"  # predictions written inside dataset_dir must not be read back as cases
    out.mkdir()
    (out / "BraTS2021_00000_seg.nii.gz").write_bytes(b"not a case")
    lists = brats_datalists(str(root), str(out), val_fraction=0.34, seed=0)
    assert [x["case"] for x in lists["test"]] == [x["case"] for x in lists["validation"]]
    assert len(lists["training"]) == 2


def test_missing_modality_names_the_case_folder_and_file(tmp_path):
    root = make_brats_dataset(tmp_path / "data", cases=2, size=SIZE, convention="2021")
    (root / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").unlink()
    with pytest.raises(InputDataError) as e:
        brats_datalists(str(root))
    msg = str(e.value)
    assert msg.startswith(f"{root / 'BraTS2021_00001'}: case BraTS2021_00001 lacks")
    assert str(root / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz") in msg and "T1CE modality" in msg
    # 2023 naming: the message uses the 2023 file names
    root23 = make_brats_dataset(tmp_path / "d23", cases=1, size=SIZE, convention="2023")
    (root23 / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz").unlink()
    with pytest.raises(InputDataError, match="BraTS-GLI-00000-000-t1n.nii.gz"):
        brats_datalists(str(root23), require_labels=False)


def test_missing_segmentation_is_an_error_for_training_only(tmp_path):
    root = make_brats_dataset(tmp_path / "data", cases=2, test=1, size=SIZE, convention="2021")
    with pytest.raises(InputDataError, match=r"BraTS2021_00002_seg.nii.gz \(the segmentation\)"):
        brats_datalists(str(root), require_labels=True)
    assert [x["case"] for x in brats_datalists(str(root), require_labels=False)["test"]] == ["BraTS2021_00002"]
    unlabelled = make_brats_dataset(tmp_path / "val", cases=0, test=2, size=SIZE, convention="2021")
    with pytest.raises(InputDataError, match="lacks"):
        brats_datalists(str(unlabelled))


def test_mismatched_modality_shape_and_affine_are_caught_from_headers(tmp_path):
    root = make_brats_dataset(tmp_path / "data", cases=2, size=SIZE, convention="2021")
    bad = root / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 9), np.int16), np.eye(4)), bad)
    with pytest.raises(InputDataError) as e:
        brats_datalists(str(root))
    assert str(e.value).startswith(f"{bad}: shape (12, 10, 9) does not match ")
    assert "BraTS2021_00000_flair.nii.gz (12, 10, 8)" in str(e.value)
    flair = nib.load(root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SIZE, np.int16), flair.affine * np.diag([2, 1, 1, 1])), bad)
    with pytest.raises(InputDataError, match=r"BraTS2021_00000_t2.nii.gz: affine .* does not match"):
        brats_datalists(str(root))
    nib.save(nib.Nifti1Image(np.zeros(SIZE + (2,), np.int16), flair.affine), bad)
    with pytest.raises(InputDataError, match=r"BraTS2021_00000_t2.nii.gz: shape \(12, 10, 8, 2\); expected a 3D"):
        brats_datalists(str(root))
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputDataError, match=str(bad)):
        brats_datalists(str(root))


def test_folder_errors(tmp_path):
    with pytest.raises(InputDataError, match="dataset_dir is missing or empty"):
        brats_datalists(str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputDataError, match="no BraTS files found"):
        brats_datalists(str(tmp_path / "other"))
    a = make_brats_dataset(tmp_path / "dup" / "a", cases=1, size=SIZE)
    make_brats_dataset(tmp_path / "dup" / "b", cases=1, size=SIZE)
    with pytest.raises(InputDataError, match="case id BraTS2021_00000 also found in"):
        brats_datalists(str(tmp_path / "dup"))
    shutil.move(str(a / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"),
                str(a / "BraTS2021_00000" / "BraTS2021_00000-t1n.nii.gz"))
    with pytest.raises(InputDataError, match="mixes BraTS 2018-2021"):
        brats_datalists(str(a))


def test_case_names_and_output_name_formatter():
    assert brats_case_name("/d/BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz") == "BraTS2021_00000"
    assert brats_case_name("BraTS20_Training_001_t1.nii") == "BraTS20_Training_001"
    assert brats_case_name("BraTS-GLI-00002-001-t2w.nii.gz") == "BraTS-GLI-00002-001"
    assert brats_case_name("img0001.nii.gz") is None
    assert brats_name_formatter({"filename_or_obj": "/d/BraTS-GLI-00002-001-t2f.nii.gz"}, None)["subject"] == \
        "BraTS-GLI-00002-001.nii.gz"
    assert brats_name_formatter({"filename_or_obj": "/d/img0001.nii.gz"}, None)["subject"] == "/d/img0001.nii.gz"


def _label(values, name="/data/case_seg.nii.gz") -> MetaTensor:
    lab = torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)
    return MetaTensor(lab, meta={"filename_or_obj": name})


def test_label_to_regions_in_both_conventions_and_back():
    lab21 = _label([0, 1, 2, 4])
    regions = brats_label_to_regions(lab21, "2021")
    assert regions.shape == (3, 1, 1, 4) and regions.meta["filename_or_obj"] == "/data/case_seg.nii.gz"
    assert regions[:, 0, 0].tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]  # TC, WT, ET
    assert torch.equal(brats_label_to_regions(_label([0, 1, 2, 3]), "2023"), regions)
    assert brats_regions_to_label(regions, "2021")[0, 0, 0].tolist() == [0, 1, 2, 4]
    assert brats_regions_to_label(regions, "2023")[0, 0, 0].tolist() == [0, 1, 2, 3]
    assert brats_regions_to_label(regions, "2020").dtype == torch.uint8
    # probabilities are thresholded; an ET voxel wins over disagreeing TC/WT outputs
    probs = torch.tensor([[0.2, 0.6, 0.1], [0.7, 0.9, 0.2], [0.1, 0.3, 0.8]]).reshape(3, 1, 3)
    assert brats_regions_to_label(probs, "2021")[0, 0].tolist() == [2, 1, 4]
    # 2D slices work the same
    assert brats_label_to_regions(torch.zeros(1, 5, 6), "2021").shape == (3, 5, 6)


def test_unknown_label_values_name_the_file():
    with pytest.raises(InputDataError, match=r"^/data/case_seg.nii.gz: label values \[5\] are not among .*\[0, 1, 2, 4\]"):
        brats_label_to_regions(_label([0, 1, 5]), "2021")
    with pytest.raises(InputDataError, match=r"label values \[3\] .* set label_convention to '2023'"):
        brats_label_to_regions(_label([0, 3]), "2021")
    with pytest.raises(InputDataError, match=r"label values \[4\] .* set label_convention to '2021'"):
        brats_label_to_regions(_label([0, 4]), "2023")
    with pytest.raises(InputDataError, match=r"label values \[1.5\]"):
        brats_label_to_regions(_label([0, 1.5]), "2021")
    with pytest.raises(InputDataError, match="both 3 and 4"):
        detect_brats_convention(_label([3, 4]))
    with pytest.raises(ValueError, match="unknown BraTS label convention"):
        brats_label_to_regions(_label([0]), "2019b")


def test_dict_transforms_carry_the_convention_per_case():
    t = BraTSLabelToRegionsd("label", convention="auto")
    d = t({"label": _label([0, 2, 3])})
    assert d["brats_convention"] == "2023" and d["label"].shape[0] == 3
    d = t({"label": _label([0, 2])})
    assert d["brats_convention"] == "2021"  # no enhancing tumour: the default
    d = t({"label": _label([0, 4]), "brats_convention": "2021"})  # the datalist's convention is checked, not guessed
    with pytest.raises(InputDataError, match=r"label values \[4\]"):
        t({"label": _label([0, 4]), "brats_convention": "2023"})
    back = RegionsToBraTSLabeld("pred")
    regions = brats_label_to_regions(_label([0, 1, 2, 4]), "2021")
    assert back({"pred": regions, "brats_convention": "2023"})["pred"][0, 0, 0].tolist() == [0, 1, 2, 3]
    assert back({"pred": regions, "brats_convention": ["2021"]})["pred"][0, 0, 0].tolist() == [0, 1, 2, 4]
    assert back({"pred": regions})["pred"][0, 0, 0].tolist() == [0, 1, 2, 4]


def test_loading_stacks_modalities_in_the_documented_order(tmp_path):
    root = make_brats_dataset(tmp_path / "data", cases=1, size=SIZE, convention="2023")
    item = brats_datalists(str(root), val_fraction=0.0)["training"][0]
    d = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)(item))
    assert d["image"].shape == (4, *SIZE)
    for c, path in enumerate(item["image"]):
        np.testing.assert_array_equal(d["image"][c].numpy(), np.asarray(nib.load(path).dataobj, np.float32))


def test_ct_generator_is_an_msd_style_btcv_set(tmp_path):
    root = make_ct_dataset(tmp_path / "ct", cases=2, test=1, size=(24, 24, 12))
    lists = msd_datalists(str(root), val_fraction=0.5, num_channels=1)
    assert [Path(x["image"]).name for x in lists["test"]] == ["img0003.nii.gz"]
    label = np.asarray(nib.load(lists["training"][0]["label"]).dataobj)
    assert set(np.unique(label)) <= set(range(14)) and len(np.unique(label)) >= 4
    image = np.asarray(nib.load(lists["training"][0]["image"]).dataobj)
    assert image.min() == -1000 and image.max() > 100  # Hounsfield units
    assert json.loads((root / "dataset.json").read_text())["labels"]["6"] == "liver"
