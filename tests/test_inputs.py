"""The input layer of every bundle (issue 15): any folder of scans in, the right file out, no silent wrong output.

Fast tests of :class:`medseg_nets.data.Datalists` for every input form and every case of the issue, then the real
command line: ``python -m monai.bundle run --config_file bundles/<name>/configs/inference.json --dataset_dir
<plain folder> --ckpt_path ... --output_dir ...`` for each of the four bundles with nothing else prepared, and
runs that stop on bad input (exit 1, the message last, nothing written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from conftest import ROOT, run_cli
from make_demo_data import make_brats_dataset, make_case, make_dataset, make_skin_case, make_skin_dataset

from medseg_nets import InputDataError
from medseg_nets.data import Datalists, PNGMaskWriter, exif_orientation, rgb_image
from medseg_nets.handlers import CheckpointError, CheckpointLoader
from medseg_nets.transforms import CheckSegmentationInputd
from medseg_nets.utils import prepare_output_dir

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")

BUNDLES = ROOT / "bundles"
SIZE = (20, 20, 16)


def _volume(path: Path, seed: int = 0, size=SIZE, affine=None) -> Path:
    image, _ = make_case(np.random.default_rng(seed), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.eye(4) if affine is None else affine), path)
    return path


def _names(items) -> list[str]:
    return [Path(i["image"] if isinstance(i["image"], str) else i["image"][0]).name for i in items]


def _lists(path, kind="msd", purpose="inference", **kw) -> dict:
    d = Datalists(str(path), kind, purpose, num_channels=kw.pop("num_channels", 3 if kind == "skin" else 4), **kw)
    d.start()
    return d.lists()


# --------------------------------------------------------------------------------------------- input forms


def test_plain_folder_imagests_single_file_and_datalist_json(tmp_path, caplog):
    plain = tmp_path / "scans"
    _volume(plain / "patient A.nii.gz", 0)
    _volume(plain / "b.nii", 1)
    _volume(plain / "old_seg.nii.gz", 2)  # a prediction left in the folder: not predicted again
    (plain / "notes.txt").write_text("x")
    caplog.set_level("INFO")
    for kind in ("msd", "brats"):
        lists = _lists(plain, kind)
        assert _names(lists["test"]) == ["b.nii", "patient A.nii.gz"]
    assert "folder of 4-channel NIfTI volumes" in caplog.text and "patient A.nii.gz" in caplog.text
    assert "old_seg.nii.gz" in caplog.text  # said why it is skipped
    assert _lists(plain, "brats")["test"][0]["brats_convention"] == "2021"
    # imagesTs/
    ts = tmp_path / "task"
    _volume(ts / "imagesTs" / "c.nii.gz")
    assert _names(_lists(ts)["test"]) == ["c.nii.gz"]
    # one file
    assert _names(_lists(plain / "b.nii")["test"]) == ["b.nii"]
    # a datalist JSON: a list, relative to the JSON's folder
    (tmp_path / "list.json").write_text(json.dumps(["scans/b.nii", {"image": "scans/patient A.nii.gz"}]))
    assert _names(_lists(tmp_path / "list.json")["test"]) == ["b.nii", "patient A.nii.gz"]
    # training from imagesTr/ + labelsTr/ without dataset.json, and from a datalist dict
    (ts / "labelsTr").mkdir()
    for i in range(2):
        _volume(ts / "imagesTr" / f"x{i}.nii.gz", i)
        nib.save(nib.Nifti1Image(np.zeros(SIZE, np.uint8), np.eye(4)), ts / "labelsTr" / f"x{i}.nii.gz")
    lists = _lists(ts, purpose="train", val_fraction=0.5)
    assert len(lists["training"]) == len(lists["validation"]) == 1 and "label" in lists["training"][0]
    (tmp_path / "train.json").write_text(json.dumps({"training": [
        {"image": f"task/imagesTr/x{i}.nii.gz", "label": f"task/labelsTr/x{i}.nii.gz"} for i in range(2)]}))
    assert len(_lists(tmp_path / "train.json", purpose="train", val_fraction=0.5)["training"]) == 1


def test_brats_bundles_read_case_folders_and_4_channel_files_alike(tmp_path):
    data = make_brats_dataset(tmp_path / "brats", cases=1, test=1, size=SIZE)
    lists = _lists(data, "brats")
    assert [i["case"] for i in lists["test"]] == ["BraTS2021_00001"] and len(lists["test"][0]["image"]) == 4
    with pytest.raises(InputDataError, match="one modality file of BraTS case BraTS2021_00001; expected its case"):
        _lists(tmp_path / "brats" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz", "brats")  # 1 channel
    assert _names(_lists(_volume(tmp_path / "one.nii.gz"), "brats")["test"]) == ["one.nii.gz"]


def test_skin_plain_folder_of_photos_and_a_png_beside_isic_jpgs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("lesion_a.jpg", "mole 2.jpg", "c.PNG", "c_seg.png"):
        Image.fromarray(make_skin_case(rng, (20, 24), hairs=False)[0]).save(photos / name)
    assert _names(_lists(photos, "skin")["test"]) == ["c.PNG", "lesion_a.jpg", "mole 2.jpg"]
    isic = make_skin_dataset(tmp_path / "isic", cases=2, size=(20, 24), layout="isic2018")
    extra = next(isic.rglob("ISIC_*.jpg")).parent / "extra photo.png"
    Image.fromarray(make_skin_case(rng, (20, 24), hairs=False)[0]).save(extra)
    test = _lists(isic, "skin")["test"]
    assert str(extra) in [i["image"] for i in test] and len(test) == 3


# ----------------------------------------------------------------------------------- built when it runs


def test_nothing_is_read_until_the_run_starts(tmp_path):
    where = tmp_path / "later"
    d = Datalists(str(where), "msd", "inference", num_channels=4)
    test = d["test"]
    assert len(test) == 1  # a stand-in length while the workflow is only built and inspected ...
    with pytest.raises(InputDataError, match="dataset_dir does not exist"):
        test[0]  # ... never an item
    _volume(where / "a.nii.gz")
    with pytest.raises(RuntimeError, match="create the workflow again"):
        d.start()  # parts built with the stand-in length must not run on the data now present
    d = Datalists(str(where), "msd", "inference", num_channels=4, output_dir=str(tmp_path / "out"))
    assert len(d["test"]) == 1 and not (tmp_path / "out").exists()  # inspecting writes nothing
    d.start()
    assert _names(d["test"]) == ["a.nii.gz"] and (tmp_path / "out" / "datalist_split.json").is_file()
    d = Datalists(str(tmp_path / "none"), "msd")
    d.start()  # a run that never uses the datalists (MONAI Label sets its own) never reads dataset_dir
    with pytest.raises(InputDataError, match="dataset_dir does not exist"):
        len(d["test"])  # when running, a failure is raised at first use, not hidden behind a stand-in


@pytest.mark.parametrize("bundle", ["dalight3d", "glims", "emcad", "eamnet"])
def test_workflows_are_created_and_checked_with_no_data(bundle, tmp_path):
    from monai.bundle import create_workflow

    for workflow_type, config in (("inference", "inference.json"), ("train", "train.json")):
        wf = create_workflow(config_file=str(BUNDLES / bundle / "configs" / config), workflow_type=workflow_type,
                             bundle_root=str(tmp_path), output_dir=str(tmp_path / "out"))
        assert wf.check_properties() == []
    assert not (tmp_path / "out" / "datalist_split.json").exists()  # no data was looked for
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    assert meta["supported_apps"] == {"monailabel": ""}


# ------------------------------------------------------------------------------------ no silent wrong output


def test_missing_listed_test_files_are_an_error_that_lists_them(tmp_path):
    data = make_dataset(tmp_path / "Task01", cases=2, test=2, size=SIZE)
    meta = json.loads((data / "dataset.json").read_text())
    meta["test"] = [t.replace("imagesTs", "ImagesTs") for t in meta["test"]]  # a letter-case mismatch
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputDataError, match=r"2 listed file\(s\) not found") as e:
        _lists(data)
    assert all(str(data / t) in str(e.value) for t in meta["test"])


def test_fallback_to_validation_says_which_cases(tmp_path, caplog):
    data = make_dataset(tmp_path / "Task01", cases=2, test=0, size=SIZE)
    caplog.set_level("INFO")
    lists = _lists(data, val_fraction=0.5)
    assert len(lists["test"]) == 1 and "label" not in lists["test"][0]
    assert "predicts the 1 held-out validation case(s)" in caplog.text and _names(lists["test"])[0] in caplog.text


def test_symlinks_keep_their_names_and_each_link_gives_its_own_output(tmp_path):
    store = _volume(tmp_path / "store" / "sha256-0a1b.nii.gz")
    folder = tmp_path / "links"
    folder.mkdir()
    os.symlink(store, folder / "left.nii.gz")
    os.symlink(store, folder / "right.nii.gz")
    assert _names(_lists(folder)["test"]) == ["left.nii.gz", "right.nii.gz"]


def test_two_inputs_with_one_output_name_are_an_error(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([str(_volume(tmp_path / d / "x.nii.gz")) for d in "ab"]))
    with pytest.raises(InputDataError, match="would give predictions of the same name"):
        _lists(tmp_path / "list.json")


def test_channel_first_volume_is_rejected_even_when_z_equals_the_channels(tmp_path):
    image, _ = make_case(np.random.default_rng(0), (32, 32, 4))  # (X, Y, Z=4, C=4)
    path = tmp_path / "cf" / "cf.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.moveaxis(image, -1, 0), np.eye(4)), path)  # saved channel-first (4, 32, 32, 4)
    for kind in ("msd", "brats"):
        with pytest.raises(InputDataError, match=re.escape(f"{path}: shape (4, 32, 32, 4) looks channel-first")):
            _lists(path.parent, kind)


def test_brats_stray_files_and_predictions_in_the_data_folder_are_ignored(tmp_path, caplog):
    data = make_brats_dataset(tmp_path / "BraTS", cases=1, test=1, size=SIZE)
    case = data / "BraTS2021_00001"
    shutil.copy(case / "BraTS2021_00001_t2.nii.gz", case / "BraTS2021_00001_flair_to_t2.nii.gz")
    shutil.copy(case / "BraTS2021_00001_t2.nii.gz", data / "BraTS2021_00001_seg.nii.gz")  # an earlier prediction
    caplog.set_level("WARNING")
    lists = _lists(data, "brats")
    assert [i["case"] for i in lists["test"]] == ["BraTS2021_00001"]
    assert "BraTS2021_00001_flair_to_t2.nii.gz (an extra file of case BraTS2021_00001)" in caplog.text
    assert "BraTS2021_00001_seg.nii.gz (a segmentation without the four modalities)" in caplog.text


def test_all_zero_volume_names_the_file():
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(4, 8, 8, 8), meta={"filename_or_obj": "/d/blank.nii.gz"})
    with pytest.raises(InputDataError, match=re.escape("/d/blank.nii.gz: every voxel is 0")):
        CheckSegmentationInputd("image", None, num_channels=4)({"image": image})


def test_exif_orientation_applied_on_read_and_undone_on_write(tmp_path):
    """A photo stored 30 x 20 (width x height) with EXIF orientation 6 (viewers turn it 90 degrees): the network
    sees it 20 x 30 as viewers show it; the mask is written on the stored pixels with the same orientation tag."""
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :10] = 255  # a bright patch in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(src, exif=exif, quality=100)
    with Image.open(src) as img:
        shown = rgb_image(img)
        assert shown.size == (20, 30)
        shown_mask = np.asarray(shown.convert("L")) > 128  # (30, 20): the patch where viewers show it
    writer = PNGMaskWriter()
    writer.set_data_array(torch.as_tensor(shown_mask.T[None].astype(np.float32)))  # MONAI's (C, W, H)
    writer.set_metadata({"filename_or_obj": str(src)})
    writer.write(tmp_path / "turned_seg.png")
    with Image.open(tmp_path / "turned_seg.png") as out:
        assert out.size == (30, 20) and exif_orientation(out) == 6
        mask = np.asarray(out) > 0
    assert mask[:5, :10].all() and mask.sum() == 50


# -------------------------------------------------------------------------------------- clear failures


@pytest.fixture(scope="module")
def dalight_net():
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "dalight3d" / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def test_checkpoint_errors_name_the_file(tmp_path, dalight_net):
    def error(path) -> str:
        with pytest.raises(CheckpointError) as e:
            CheckpointLoader(str(path), {"model": dalight_net})(None)
        return str(e.value)

    good = tmp_path / "model.pt"
    torch.save(dalight_net.state_dict(), good)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert error(tmp_path / "empty.pt") == (f"checkpoint {tmp_path / 'empty.pt'} is empty (0 bytes); expected a "
                                            "model.pt written by this bundle's train.json (or converted with "
                                            "tools/import_weights.py)")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    assert error(tmp_path / "cut.pt").startswith(f"checkpoint {tmp_path / 'cut.pt'} cannot be read")
    other = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    msg = error(tmp_path / "other.pt")
    assert msg.startswith(f"checkpoint {tmp_path / 'other.pt'} does not fit this bundle's network DALight3D: ")
    assert len(msg) < 1000  # examples, not every key
    # a training checkpoint given as --ckpt_path: its network weights are loaded
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in dalight_net.state_dict().items()}
    torch.save({"network": state, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "checkpoint_latest.pt")
    CheckpointLoader(str(tmp_path / "checkpoint_latest.pt"), {"model": dalight_net})(None)
    assert torch.equal(dalight_net.state_dict()["stem.0.weight"], state["stem.0.weight"])


def test_output_dir_that_is_a_file_or_read_only(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputDataError, match=re.escape(f"{tmp_path / 'f'}: is a file; expected a folder")):
        prepare_output_dir(tmp_path / "f")
    if Path("/proc/self").is_dir():  # a folder nobody can create, root included
        with pytest.raises(InputDataError, match=re.escape("/proc/self/out: cannot write there")):
            prepare_output_dir("/proc/self/out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(InputDataError, match=re.escape(f"{ro / 'out'}: cannot write there")):
            prepare_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------- the command line, nothing else prepared


def _weights(bundle: str, path: Path, **overrides) -> Path:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    for k, v in overrides.items():
        parser[k] = v
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _infer(bundle: str, data: Path, ckpt: Path, out: Path, *extra: str):
    return run_cli(["run", "--config_file", str(BUNDLES / bundle / "configs" / "inference.json"), "--dataset_dir",
                    str(data), "--ckpt_path", str(ckpt), "--output_dir", str(out), "--num_workers", "0", *extra],
                   check=False)


def _assert_stopped(proc, *expected: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    tail = proc.stderr.rstrip().rsplit("The run stopped on bad input:", 1)
    assert len(tail) == 2 and "Traceback" not in tail[1] and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in tail[1], (text, proc.stderr[-3000:])


@pytest.mark.parametrize("bundle, extra, net", [
    ("dalight3d", ["--roi_size", "[16,16,16]"], {}),
    ("glims", ["--roi_size", "[32,32,32]", "--sw_batch_size", "1", "--network_def#feature_size", "3"],
     {"network_def#feature_size": 3}),
    ("emcad", ["--network_def#encoder", "pvt_v2_b0"], {"network_def#encoder": "pvt_v2_b0"}),
])
def test_cli_inference_on_a_plain_folder_of_4_channel_volumes(bundle, extra, net, tmp_path):
    folder = tmp_path / "my scans"
    src = _volume(tmp_path / "store" / "sha256-77.nii.gz", 3, affine=np.diag([-1.2, 1.0, 1.5, 1.0]))
    folder.mkdir()
    os.symlink(src, folder / "visit 1.nii.gz")
    proc = _infer(bundle, folder, _weights(bundle, tmp_path / "w.pt", **net), tmp_path / "out", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 case(s) to predict" in proc.stdout and "visit 1.nii.gz" in proc.stdout
    pred = nib.load(tmp_path / "out" / "visit 1_seg.nii.gz")
    assert pred.shape == SIZE and np.allclose(pred.affine, nib.load(src).affine)


def test_cli_eamnet_inference_on_a_folder_of_photos(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(make_skin_case(np.random.default_rng(1), (30, 40), hairs=False)[0]).save(photos / "mole 2.jpg")
    proc = _infer("eamnet", photos, _weights("eamnet", tmp_path / "w.pt"), tmp_path / "out", "--image_size", "[32,32]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    with Image.open(tmp_path / "out" / "mole 2_seg.png") as mask:
        assert mask.size == (40, 30)


def test_cli_bad_case_after_a_good_one_leaves_nothing_written(tmp_path):
    folder = tmp_path / "scans"
    _volume(folder / "a_good.nii.gz")
    image, _ = make_case(np.random.default_rng(1), SIZE)
    image[2, 2, 2, 0] = np.nan  # passes the header checks, fails when loaded, after a_good was predicted
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "b_nan.nii.gz")
    out = tmp_path / "out"
    proc = _infer("dalight3d", folder, _weights("dalight3d", tmp_path / "w.pt"), out, "--roi_size", "[16,16,16]")
    _assert_stopped(proc, f"{folder / 'b_nan.nii.gz'}: contains 1 NaN/infinite voxel(s)")
    assert "removed 2 file(s) this run had written" in proc.stderr
    assert list(out.iterdir()) == []  # no prediction, no split file
    log = re.search(r"full traceback: (\S+)", proc.stderr).group(1)
    assert "Traceback" in Path(log).read_text()


def test_cli_checkpoint_of_another_bundle_and_unwritable_output(tmp_path):
    folder = tmp_path / "scans"
    _volume(folder / "a.nii.gz")
    other = _weights("eamnet", tmp_path / "eamnet.pt")
    proc = _infer("dalight3d", folder, other, tmp_path / "out", "--roi_size", "[16,16,16]")
    _assert_stopped(proc, f"checkpoint {other} does not fit this bundle's network DALight3D")
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "file").write_text("x")
    proc = _infer("dalight3d", folder, other, tmp_path / "file")
    _assert_stopped(proc, f"{tmp_path / 'file'}: is a file; expected a folder for the outputs")


def test_cli_eamnet_training_with_a_16_bit_mask_exits_1_without_abort(tmp_path):
    data = make_skin_dataset(tmp_path / "isic", cases=2, size=(24, 32), layout="isic2018")
    mask = sorted(data.rglob("*_segmentation.png"))[0]
    Image.fromarray(np.asarray(Image.open(mask)).astype(np.uint16) * 257).save(mask)  # 16-bit 0/65535
    for workers in ("0", "1"):
        proc = run_cli(["run", "--config_file", str(BUNDLES / "eamnet" / "configs" / "train.json"), "--dataset_dir",
                        str(data), "--bundle_root", str(tmp_path / "run"), "--epochs", "1", "--num_workers", workers,
                        "--image_size", "[32,32]", "--val_fraction", "0.5"], check=False)
        _assert_stopped(proc, str(mask))
        assert not (tmp_path / "run" / "eval" / "datalist_split.json").exists()


def test_labelled_split_and_demo_progress_lines(tmp_path):
    isic = make_skin_dataset(tmp_path / "isic", cases=3, size=(20, 24), layout="isic2018")
    lists = _lists(isic, "skin", purpose="train", val_fraction=0.34)
    assert len(lists["labelled"]) == 3 and len(lists["validation"]) == 1
    import demo

    lines, rest = demo._progress_lines(b"INFO x\ntrain[1/4]  25%|## [00:01]\rtrain[2/4]  50%|### [00:02]2026-11-29 "
                                       b"14:49:42,434 - ignite - INFO - x\rval[1/1] 100%|## [00:00]\x1b[A\rtrain[3")
    assert lines == ["train[1/4]  25%|## [00:01]", "train[2/4]  50%|### [00:02]", "val[1/1] 100%|## [00:00]"]
    assert rest == b"train[3"


def test_cli_all_zero_training_volume_names_the_file(tmp_path):
    data = make_dataset(tmp_path / "Task01", cases=2, test=0, size=SIZE)
    d = Datalists(str(data), "msd", "train", val_fraction=0.5, num_channels=4)
    d.start()
    blank = Path(d["training"][0]["image"])
    nib.save(nib.Nifti1Image(np.zeros(SIZE + (4,), np.float32), nib.load(blank).affine), blank)
    proc = run_cli(["run", "--config_file", str(BUNDLES / "dalight3d" / "configs" / "train.json"), "--dataset_dir",
                    str(data), "--bundle_root", str(tmp_path / "run"), "--epochs", "1", "--num_workers", "0",
                    "--val_fraction", "0.5", "--roi_size", "[16,16,16]"], check=False)
    _assert_stopped(proc, f"{blank}: every voxel is 0")
    assert "No sampling location" not in proc.stderr
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("datalist_split.json"))
