"""Bad input -> InputDataError naming the file and what was expected, and no partial output (issue 3).

Each bad input is tested at the transform/datalist level (fast) and the important ones through the real CLI
(``python -m monai.bundle run`` with the DALight-3D bundle): non-zero exit, the file and the expectation in stderr,
nothing half-written left in the output folders.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd

from conftest import ROOT, run_cli
from make_demo_data import make_dataset

from medseg_nets import InputDataError
from medseg_nets.data import check_nifti_headers, msd_datalists
from medseg_nets.handlers import MissingCheckpointError
from medseg_nets.transforms import CheckSegmentationInputd, EnsureIdentifierd, LoadImageCheckedd
from medseg_nets.utils import input_errors

CFG = ROOT / "bundles" / "dalight3d" / "configs"
FAST = ["--roi_size", "[16,16,16]", "--num_workers", "0", "--val_fraction", "0.5", "--sw_batch_size", "2"]
CHANNELS = ["FLAIR", "T1w", "T1gd", "T2w"]
NIFTI = "expected a complete, readable NIfTI (.nii/.nii.gz) file"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A tiny valid MSD Task01-like dataset: 2 labelled cases (1 train + 1 validation at val_fraction 0.5), 2 test."""
    return make_dataset(tmp_path_factory.mktemp("clean") / "Task01_BrainTumour", cases=2, test=2, size=(20, 20, 16))


@pytest.fixture
def data(clean, tmp_path) -> Path:
    """A fresh copy of ``clean`` to break."""
    return Path(shutil.copytree(clean, tmp_path / "Task01_BrainTumour"))


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _resave(path: Path, array: np.ndarray) -> None:
    """Replace the voxels of ``path``, keeping its affine."""
    nib.save(nib.Nifti1Image(array, nib.load(path).affine), path)


def _loader(label: bool = True) -> Compose:
    """The bundle's first three loading transforms (as in train.json / inference.json)."""
    keys = ["image", "label"] if label else ["image"]
    return Compose([
        LoadImageCheckedd(keys, expected="NIfTI (.nii/.nii.gz)"),
        EnsureChannelFirstd(keys),
        CheckSegmentationInputd("image", "label" if label else None, num_channels=4, channel_names=CHANNELS,
                                label_values=[0, 1, 2, 3]),
    ])


def _load_error(case: dict[str, str], label: bool = True) -> str:
    """The InputDataError message of loading ``case`` as the bundle does. MONAI's ``Compose`` wraps it in a
    ``RuntimeError('applying transform ...')``; the bad-input message is found in the exception chain."""
    with pytest.raises(RuntimeError, match="applying transform") as e:
        _loader(label)(case)
    messages = input_errors(e.value)
    assert len(messages) == 1 and isinstance(e.value.__cause__, InputDataError), messages
    return messages[0]


def _case(root: Path, i: int = 1) -> dict[str, str]:
    name = f"BRATS_{i:03d}.nii.gz"
    return {"image": str(root / "imagesTr" / name), "label": str(root / "labelsTr" / name)}


def _leftovers(folder: Path) -> list[str]:
    """Half-written or temporary files anywhere under ``folder``."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "partial" in p.name or p.name.startswith("."))


# ------------------------------------------------------------------------------------- transform level (fast)


def test_clean_case_passes_the_checks(clean):
    out = _loader()(_case(clean))
    assert out["image"].shape == (4, 20, 20, 16) and out["label"].shape == (1, 20, 20, 16)


def test_truncated_nifti_names_the_file(data):
    case = _case(data)
    _truncate(Path(case["image"]))
    msg = _load_error(case)
    assert msg.startswith(f"{case['image']}: cannot be read (EOFError")
    assert msg.endswith("expected a complete, readable NIfTI (.nii/.nii.gz) file")
    missing = str(data / "imagesTr" / "nothere.nii.gz")
    assert _load_error({"image": missing}, label=False).startswith(f"{missing}: cannot be read")
    with pytest.raises(InputDataError, match=re.escape(missing) + ": cannot be read"):  # the transform on its own
        LoadImageCheckedd("image")({"image": missing})


def test_three_channels_instead_of_four_names_the_file_and_channels(data):
    case = _case(data)
    _resave(Path(case["image"]), np.asarray(nib.load(case["image"]).dataobj)[..., :3])
    assert _load_error(case) == (f"{case['image']}: has 3 channel(s) (channel-first shape (3, 20, 20, 16)), "
                            "expected 4 (FLAIR, T1w, T1gd, T2w)")


def test_label_shape_mismatch_names_both_files(data):
    case = _case(data)
    _resave(Path(case["label"]), np.asarray(nib.load(case["label"]).dataobj)[:, :, :12])
    msg = _load_error(case)
    assert msg.startswith(f"{case['label']}: label shape (1, 20, 20, 12) does not match image {case['image']}")
    assert msg.endswith("expected one channel with spatial shape (20, 20, 16)")


@pytest.mark.parametrize("value", [5, 255])
def test_label_values_outside_0_to_3_name_the_file(data, value):
    case = _case(data)
    label = np.asarray(nib.load(case["label"]).dataobj).copy()
    label[0, 0, 0] = value
    _resave(Path(case["label"]), label)
    assert _load_error(case) == f"{case['label']}: label values [{value}] are not among the expected [0, 1, 2, 3]"


def test_non_integer_or_nan_label_values_are_rejected():
    name = "/data/labelsTr/x.nii.gz"
    image = MetaTensor(torch.rand(4, 3, 3, 3), meta={"filename_or_obj": "/data/imagesTr/x.nii.gz"})
    check = CheckSegmentationInputd("image", "label", num_channels=4, label_values=[0, 1, 2, 3])
    for bad, expected in ((1.5, "label values [1.5] are not among"), (float("nan"), "label contains NaN/infinite")):
        label = torch.zeros(1, 3, 3, 3)
        label[0, 1, 1, 1] = bad
        with pytest.raises(InputDataError, match=re.escape(f"{name}: {expected}")):
            check({"image": image, "label": MetaTensor(label, meta={"filename_or_obj": name})})


def test_nan_filled_volume_names_the_file(data):
    case = _case(data)
    image = np.full(nib.load(case["image"]).shape, np.nan, dtype=np.float32)
    _resave(Path(case["image"]), image)
    assert _load_error(case) == f"{case['image']}: contains {image.size} NaN/infinite voxel(s); expected finite intensities"
    # a single infinite voxel is enough; in-memory data without a file name still says what it is
    arr = torch.ones(4, 2, 2, 2)
    arr[1, 0, 0, 0] = float("inf")
    with pytest.raises(InputDataError, match=re.escape("<in-memory image>: contains 1 NaN/infinite voxel(s)")):
        CheckSegmentationInputd("image", None)({"image": arr})


def test_bad_identifier_names_the_case():
    with pytest.raises(InputDataError, match=r"identifier='site A' for img.nii.gz: expected an integer"):
        EnsureIdentifierd()({"image": "img.nii.gz", "identifier": "site A"})
    assert EnsureIdentifierd()({"image": "x"})["identifier"].item() == -1


# --------------------------------------------------------------------------------------- datalist level (fast)


def test_empty_or_missing_dataset_dir(tmp_path):
    for folder in (tmp_path / "empty", tmp_path / "does_not_exist"):
        if folder.name == "empty":
            folder.mkdir()
        with pytest.raises(InputDataError) as e:
            msd_datalists(str(folder), output_dir=str(tmp_path / "out"))
        assert str(e.value).startswith(f"{folder}: dataset_dir is missing or empty; expected an MSD task folder")
    assert not (tmp_path / "out").exists()


def test_broken_dataset_json(data, tmp_path):
    meta_file = data / "dataset.json"
    meta = json.loads(meta_file.read_text())
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({**meta, "training": []}), "has no 'training' entries; expected a list of {'image', 'label'}"),
        (json.dumps({**meta, "training": [{"image": "./imagesTr/BRATS_001.nii.gz"}]}), "training entry .* has no 'label'"),
        (json.dumps({**meta, "training": [{"label": "./labelsTr/BRATS_001.nii.gz"}]}), "an entry of 'training' has no 'image'"),
    ]
    for text, expected in cases:
        meta_file.write_text(text)
        with pytest.raises(InputDataError, match=re.escape(str(meta_file)) + ": .*" + expected):
            msd_datalists(str(data))
    meta_file.write_text(json.dumps(meta))
    (data / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(InputDataError, match=re.escape(f"{data / 'labelsTr' / 'BRATS_002.nii.gz'}: listed in {meta_file}")):
        msd_datalists(str(data))
    meta_file.unlink()
    with pytest.raises(InputDataError, match=re.escape(f"{meta_file}: not found; expected the MSD dataset.json")):
        msd_datalists(str(data))


def test_header_checks_catch_channels_shapes_and_truncation_before_loading(data, tmp_path):
    img1, lab2 = data / "imagesTr" / "BRATS_001.nii.gz", data / "labelsTr" / "BRATS_002.nii.gz"
    test1 = data / "imagesTs" / "BRATS_003.nii.gz"
    _resave(img1, np.asarray(nib.load(img1).dataobj)[..., :3])
    _resave(lab2, np.asarray(nib.load(lab2).dataobj)[:, :, :12])
    _truncate(test1, keep=0.6)  # the header is intact, the voxel data is not
    with pytest.raises(InputDataError) as e:
        msd_datalists(str(data), output_dir=str(tmp_path / "out"), val_fraction=0.5, num_channels=4)
    lines = str(e.value).splitlines()
    assert lines[0] == "3 problems with the input files:"
    problems = {line.strip().split(": ", 1)[0]: line.strip() for line in lines[1:]}
    assert set(problems) == {str(img1), str(lab2), str(test1)}
    assert problems[str(img1)] == (f"{img1}: shape (20, 20, 16, 3) has 3 channel(s), expected a 4D volume with 4 channels on "
                           "the last axis (X, Y, Z, C)")
    assert problems[str(lab2)] == (f"{lab2}: label shape (20, 20, 12) does not match image {data / 'imagesTr' / 'BRATS_002.nii.gz'}"
                           " shape (20, 20, 16, 4); expected a 3D label map of spatial shape (20, 20, 16)")
    assert problems[str(test1)].startswith(f"{test1}: file is truncated or corrupt (EOFError")
    assert problems[str(test1)].endswith(NIFTI)
    assert not (tmp_path / "out").exists()  # the split is written only for a dataset that passed


def test_header_check_single_problem_and_file_types(tmp_path, clean):
    src = clean / "imagesTr" / "BRATS_001.nii.gz"
    plain = tmp_path / "case.nii"
    nib.save(nib.load(src), plain)
    check_nifti_headers([{"image": str(plain)}], 4)  # complete uncompressed file passes
    _truncate(plain, keep=0.9)
    with pytest.raises(InputDataError, match=re.escape(f"{plain}: file is truncated: ") + r"\d+ bytes, the header"):
        check_nifti_headers([{"image": str(plain)}], 4)
    stub = tmp_path / "stub.nii.gz"
    stub.write_bytes(src.read_bytes()[:30])  # not even a header
    with pytest.raises(InputDataError, match=re.escape(f"{stub}: cannot be read as NIfTI (") + ".*" + re.escape(NIFTI)):
        check_nifti_headers([{"image": str(stub)}], 4)
    # a valid multi-member gzip (e.g. from some compressors) is not mistaken for a truncated file
    import gzip

    raw = gzip.decompress(src.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_nifti_headers([{"image": str(multi)}], 4)
    with pytest.raises(InputDataError, match=r"(?s)^3 problems with the input files:\n  [^\n]*\n  [^\n]*\n  \.\.\. and 1 more$"):
        check_nifti_headers([{"image": str(stub)}] * 3, 4, max_listed=2)
    label3d = np.zeros((20, 20, 16, 2), np.uint8)
    nib.save(nib.Nifti1Image(label3d, np.eye(4)), tmp_path / "lab.nii.gz")
    with pytest.raises(InputDataError, match="expected a 3D label map of spatial shape"):
        check_nifti_headers([{"image": str(src), "label": str(tmp_path / "lab.nii.gz")}], 4)


def test_missing_checkpoint_is_an_input_data_error(tmp_path):
    from medseg_nets.handlers import CheckpointLoader, ResumeFromCheckpoint

    with pytest.raises(MissingCheckpointError) as e:
        ResumeFromCheckpoint(str(tmp_path), {"network": torch.nn.Linear(1, 1)}, enabled=True)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, InputDataError)
    loader = CheckpointLoader(str(tmp_path / "model.pt"), {"model": torch.nn.Linear(1, 1)})
    with pytest.raises(InputDataError, match=re.escape(f"checkpoint {tmp_path / 'model.pt'} not found: train")):
        loader(None)


def test_bad_input_messages_close_the_traceback(capsys, monkeypatch):
    """MONAI wraps the InputDataError (transforms, config expressions, DataLoader workers); the hook ends the output
    with it, and writes the traceback to a log file instead of the terminal."""
    import sys

    from medseg_nets.utils import excepthook, install_excepthook

    monkeypatch.setattr(excepthook, "HARD_EXIT", False)
    install_excepthook()  # idempotent (already installed when medseg_nets.utils was imported)
    install_excepthook()
    assert getattr(sys.excepthook, "_medseg_nets", False)
    try:
        try:
            try:
                raise InputDataError("/d/a.nii.gz: has 3 channel(s), expected 4")
            except InputDataError as inner:
                raise RuntimeError("applying transform <LoadImageCheckedd>") from inner
        except RuntimeError:
            raise RuntimeError("Failed to evaluate ConfigExpression")  # implicit __context__
    except RuntimeError as outer:
        exc = outer
    assert input_errors(exc) == ["/d/a.nii.gz: has 3 channel(s), expected 4"]
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  ...\nmedseg_nets.errors.InputDataError: /d/b.nii.gz: label values [4] are not "
                          "among the expected [0, 1, 2, 3]\n\nThe above exception ...\n")
    assert input_errors(worker) == ["/d/b.nii.gz: label values [4] are not among the expected [0, 1, 2, 3]"]
    assert input_errors(RuntimeError("unrelated")) == []
    sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert err.rstrip().endswith("The run stopped on bad input:\nInputDataError: /d/a.nii.gz: has 3 channel(s), expected 4")
    assert "Traceback" not in err
    log = Path(re.search(r"full traceback: (\S+)", err).group(1))
    assert "Failed to evaluate ConfigExpression" in log.read_text() and "Traceback" in log.read_text()
    plain = InputDataError("/d/c.nii.gz: bad")
    sys.excepthook(InputDataError, plain, None)
    assert capsys.readouterr().err.rstrip().endswith("The run stopped on bad input:\nInputDataError: /d/c.nii.gz: bad")
    sys.excepthook(RuntimeError, RuntimeError("a bug"), None)  # not bad input: Python's own report
    assert "The run stopped" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------- through the real CLI


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights of the bundle's network, so that inference fails for the data, not the checkpoint."""
    parser = ConfigParser()
    parser.read_config(str(CFG / "inference.json"))
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _bundle(config: str | list[str], dataset_dir: Path, root: Path, *extra: str):
    files = [str(CFG / c) for c in ([config] if isinstance(config, str) else config)]
    cfg = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    return run_cli(["run", "--config_file", cfg, "--meta_file", str(CFG / "metadata.json"), "--logging_file",
                    str(CFG / "logging.conf"), "--dataset_dir", str(dataset_dir), "--bundle_root", str(root),
                    *FAST, *extra], check=False)


def _assert_failed_naming(proc, *expected: str) -> None:
    """Non-zero exit, and stderr ends with the bad-input message(s) (after MONAI's wrapped tracebacks)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "The run stopped on bad input:\nInputDataError: " in proc.stderr, proc.stderr[-6000:]
    closing = proc.stderr.rsplit("The run stopped on bad input:", 1)[1]
    assert "Traceback" not in closing
    for text in expected:
        assert text in closing, f"{text!r} not in the closing lines of stderr:\n{proc.stderr[-6000:]}"


def test_cli_inference_with_truncated_and_three_channel_test_volumes(data, tmp_path, weights):
    """Both bad files are reported at once, before the network runs, and no prediction is written."""
    truncated, three = data / "imagesTs" / "BRATS_003.nii.gz", data / "imagesTs" / "BRATS_004.nii.gz"
    _truncate(truncated)
    _resave(three, np.asarray(nib.load(three).dataobj)[..., :3])
    out = tmp_path / "pred"
    proc = _bundle("inference.json", data, tmp_path, "--output_dir", str(out), "--ckpt_path", str(weights))
    _assert_failed_naming(
        proc, "2 problems with the input files:",
        f"{truncated}: file is truncated or corrupt (EOFError", NIFTI,
        f"{three}: shape (20, 20, 16, 3) has 3 channel(s), expected a 4D volume with 4 channels on the last axis",
    )
    assert not list(out.rglob("*")), sorted(out.rglob("*"))  # no prediction, no tmp file, no split record


def test_cli_train_with_label_out_of_range(data, tmp_path):
    """Voxel-value problems (labels, NaN: same check, see the transform tests) surface when a case is loaded."""
    # break the training case (not the validation one): training fails on its first iteration
    train_case = msd_datalists(str(data), val_fraction=0.5, seed=0)["training"][0]
    label = np.asarray(nib.load(train_case["label"]).dataobj).copy()
    label[label == 3] = 4
    _resave(Path(train_case["label"]), label)
    proc = _bundle("train.json", data, tmp_path, "--epochs", "1")
    _assert_failed_naming(proc, f"{train_case['label']}: label values [4] are not among the expected [0, 1, 2, 3]")
    assert not list((tmp_path / "models").glob("*")) and _leftovers(tmp_path) == []


def test_cli_train_with_empty_dataset_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _bundle("train.json", empty, tmp_path / "run", "--epochs", "1")
    _assert_failed_naming(
        proc, f"{empty}: dataset_dir is empty; expected one of:", "an MSD task folder (dataset.json, imagesTr/, "
              "labelsTr/, imagesTs/)", "a folder of 4-channel NIfTI volumes (.nii/.nii.gz) (directly or in imagesTs/)"
    )
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.json"))


def test_cli_evaluate_with_missing_checkpoint(clean, tmp_path):
    out = tmp_path / "eval"
    proc = _bundle(["train.json", "evaluate.json"], clean, tmp_path, "--output_dir", str(out))
    _assert_failed_naming(proc, f"checkpoint {tmp_path}/models/model.pt not found: train the bundle first")
    assert not list(out.glob("metrics*")) and _leftovers(tmp_path) == []
