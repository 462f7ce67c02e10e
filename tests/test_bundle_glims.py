"""The GLIMS bundle run end to end through ``python -m monai.bundle`` on generated BraTS / BTCV-like data (CPU).

A narrow network (``feature_size`` 6) on 32^3 patches keeps it fast; everything else is the bundle's configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, assert_resumed, run_cli
from make_demo_data import make_brats_dataset, make_ct_dataset

from medseg_nets import InputDataError
from medseg_nets.losses import DiceBCELoss
from medseg_nets.losses.deep_supervision import StackedDeepSupervisionLoss

BUNDLE = ROOT / "bundles" / "glims"
CFG = BUNDLE / "configs"
BTCV_CFG = ROOT / "bundles" / "glims_btcv" / "configs"  # generated from glims's by tools/make_variant.py
# feature_size 3 is the narrowest width the default Swin heads (12, 24) allow: 16 * 3 = 48 and 32 * 3 = 96 channels
SMALL = {"network_def#feature_size": "3", "roi_size": "[32,32,32]", "num_workers": "0", "sw_batch_size": "2"}
FAST = {**SMALL, "val_fraction": "0.5", "batch_size": "1", "gradient_accumulation": "1", "num_samples": "1",
        "val_interval": "1", "epochs": "1"}
REGIONS = {"TC", "WT", "ET"}


def _cfg(*names: str, cfg: Path = CFG) -> str:
    files = [str(cfg / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def _args(options: dict[str, str]) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


def _run(configs: tuple[str, ...], data: Path, root: Path, base: dict = FAST, check: bool = True, torchrun: int = 0,
         cfg: Path = CFG, **overrides: str):
    """``python -m monai.bundle run`` of ``configs`` merged in order; ``overrides`` replace the fast defaults."""
    options = {**base, **{k.replace("__", "#"): v for k, v in overrides.items()}}
    return run_cli(["run", "--config_file", _cfg(*configs, cfg=cfg), "--meta_file", str(cfg / "metadata.json"),
                    "--logging_file", str(cfg / "logging.conf"), "--dataset_dir", str(data),
                    "--bundle_root", str(root), *_args(options)], check=check, torchrun=torchrun)


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory) -> Path:
    """4 labelled BraTS 2021 cases (2 training / 2 validation with val_fraction 0.5)."""
    return make_brats_dataset(tmp_path_factory.mktemp("brats") / "BraTS2021", cases=4, size=(32, 32, 32), seed=0)


@pytest.fixture(scope="module")
def trained(brats_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("glims_run")
    proc = _run(("train",), brats_dir, root)
    return root, proc


def test_train_writes_checkpoints_region_metrics_split_and_logs(trained, brats_dir):
    root, proc = trained
    ckpt = torch.load(root / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2  # 2 training cases, batch 1
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(ckpt["network"])
    report = json.loads((root / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2
    assert set(report["summary"]["val_mean_dice"]) == REGIONS and set(report["summary"]["val_hd95"]) == REGIONS
    split = json.loads((root / "eval" / "datalist_split.json").read_text())
    assert len(split["training"]) == 2 and len(split["validation"]) == 2
    assert {x["brats_convention"] for x in split["training"]} == {"2021"}
    assert all(len(x["image"]) == 4 and x["image"][0].endswith("_flair.nii.gz") for x in split["training"])
    assert {Path(c["image"]).name for c in report["cases"]} == {Path(x["image"][0]).name for x in split["validation"]}
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    out = proc.stdout + proc.stderr
    assert "train_loss" in out and "loss=" in out  # per-iteration log line and progress bar


def test_resume_continues_from_last_epoch(trained, brats_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    before = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    # val_interval 3 > epochs: only the final validation (FinalValidationHandler)
    proc = _run(("train",), brats_dir, root, epochs="2", resume="true", val_interval="3",
                ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    out = proc.stdout + proc.stderr
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in out
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in out
    assert_resumed(tmp_path / "models", before, out)


def test_evaluate_reports_dice_and_hd95_per_region(trained, brats_dir, tmp_path):
    root, _ = trained
    _run(("train", "evaluate"), brats_dir, root, output_dir=str(tmp_path))
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_cases"] == 2
    for region in REGIONS:
        stats = report["summary"]["val_mean_dice"][region]
        assert stats["n"] + stats["n_nan"] == 2 and (stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0)
        assert region in report["cases"][0]["val_hd95"]
    assert {"val_mean_dice", "val_hd95"} <= set(report["key_metrics"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "image,val_mean_dice/TC,val_mean_dice/WT,val_mean_dice/ET,val_hd95/TC,val_hd95/WT,val_hd95/ET"
    assert len(rows) == 3
    assert "| val_mean_dice | TC | WT | ET |" in (tmp_path / "metrics.md").read_text()


def test_inference_writes_brats_label_maps_in_the_inputs_space_and_convention(trained, tmp_path):
    root, _ = trained
    data = tmp_path / "data"  # unlabelled cases of both namings; shapes not multiples of 32
    make_brats_dataset(data, cases=0, test=1, size=(36, 30, 33), seed=5, convention="2021")
    make_brats_dataset(data, cases=0, test=1, size=(30, 40, 28), seed=6, convention="2023")
    # make every region certain (large output bias) so that the written labels show the convention
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    for key, value in weights.items():
        if key.endswith("bias") and tuple(value.shape) == (3,):
            weights[key] = torch.full_like(value, 30.0)
    torch.save(weights, tmp_path / "biased.pt")
    out = tmp_path / "out"
    run_cli(["run", "--config_file", _cfg("inference"), "--meta_file", str(CFG / "metadata.json"),
             "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(data), "--bundle_root", str(root),
             "--output_dir", str(out), "--ckpt_path", str(tmp_path / "biased.pt"), *_args(SMALL)])
    for case, flair, et in (("BraTS2021_00000", "BraTS2021_00000_flair.nii.gz", 4),
                            ("BraTS-GLI-00000-000", "BraTS-GLI-00000-000-t2f.nii.gz", 3)):
        pred = out / f"{case}_seg.nii.gz"
        assert pred.is_file(), sorted(p.name for p in out.iterdir())
        a, b = nib.load(data / case / flair), nib.load(pred)
        assert b.shape == a.shape
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
        assert b.header["qform_code"] == a.header["qform_code"] and b.header["sform_code"] == a.header["sform_code"]
        assert b.get_data_dtype() == np.uint8
        values = set(np.unique(np.asarray(b.dataobj)).tolist())
        assert values == {0, et}, (case, values)  # enhancing tumour inside the head, background outside
    assert not list(out.glob(".*partial*"))


def test_btcv_bundle_trains_and_infers(tmp_path):
    data = make_ct_dataset(tmp_path / "BTCV", cases=4, test=1, size=(48, 48, 24), seed=0)
    root = tmp_path / "run"
    _run(("train",), data, root, cfg=BTCV_CFG)
    report = json.loads((root / "eval" / "val_metrics.json").read_text())
    organs = list(report["summary"]["val_mean_dice"])
    assert len(organs) == 13 and organs[0] == "spleen" and organs[5] == "liver"
    assert "val_hd95" not in report["summary"]
    split = json.loads((root / "eval" / "datalist_split.json").read_text())
    assert len(split["training"]) == 2 and Path(split["training"][0]["image"]).parent.name == "imagesTr"
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    convs = [v for v in weights.values() if v.ndim == 5]
    assert convs[0].shape[1] == 1 and any(w.shape[0] == 14 for w in convs)  # 1 CT channel in, 14 classes out
    out = tmp_path / "out"
    run_cli(["run", "--config_file", _cfg("inference", cfg=BTCV_CFG), "--dataset_dir", str(data),
             "--bundle_root", str(root), "--output_dir", str(out), *_args(SMALL)])
    src = data / "imagesTs" / "img0005.nii.gz"
    a, b = nib.load(src), nib.load(out / "img0005_seg.nii.gz")
    assert b.shape == a.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
    assert set(np.unique(np.asarray(b.dataobj)).tolist()) <= set(range(14))


def test_torchrun_two_cpu_processes(brats_dir, tmp_path):
    _run(("train", "multi_gpu_train"), brats_dir, tmp_path, torchrun=2)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 1  # 2 training cases shared by 2 ranks
    assert not any(k.startswith("module.") for k in ckpt["network"])
    report = json.loads((tmp_path / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2 and set(report["summary"]["val_hd95"]) == REGIONS


def test_model_zoo_checks_and_torchscript_export():
    """Required files, metadata, workflow properties, verify_net_in_out (32^3), ckpt_export equal to eager."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "verify_bundle.py"), str(BUNDLE), "--n", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for check in ("files", "metadata", "properties", "verify_net_in_out", "ckpt_export"):
        assert f"PASS glims: {check}" in proc.stdout


def test_monai_label_ids_and_the_btcv_bundle_in_sync():
    """MONAI Label serves inference.json (network_def, preprocessing, inferer, postprocessing, device) and trains
    from train.json; bundles/glims_btcv is glims with tools/variants/glims_btcv.json applied, regenerated by
    ``python tools/make_variant.py glims_btcv`` after any change to glims's configs (this test fails until then)."""
    train, infer = (json.loads((CFG / f"{n}.json").read_text()) for n in ("train", "inference"))
    assert {"network_def", "preprocessing", "inferer", "postprocessing", "device", "dataset_dir"} <= set(infer)
    assert {"trainer", "dataset"} <= set(train["train"]) and "dataset" in train["validate"]
    assert infer["network_def"] == train["network_def"]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_variant.py"), "--all", "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "glims_btcv: in sync" in proc.stdout
    btcv_train, btcv_infer = (json.loads((BTCV_CFG / f"{n}.json").read_text()) for n in ("train", "inference"))
    differ = {k for k in btcv_infer if infer.get(k) != btcv_infer[k]}
    differ |= {k for k in btcv_train if train.get(k) != btcv_train[k]}
    assert {"network_def", "input_kind", "load_transforms", "preprocessing", "postprocessing", "base_loss"} <= differ
    assert not differ & {"inferer", "trainer", "train", "validate", "handlers", "optimizer", "lr_scheduler"}


def test_stacked_deep_supervision_loss():
    torch.manual_seed(0)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    stacked = torch.randn(2, 4, 3, 8, 8, 8)
    loss = StackedDeepSupervisionLoss(DiceBCELoss())
    expected = sum(w * DiceBCELoss()(stacked[:, i], target) for i, w in enumerate([1, 0.5, 0.25, 0.125]))
    assert torch.allclose(loss(stacked, target), expected)
    assert torch.allclose(loss(stacked[:, 0], target), DiceBCELoss()(stacked[:, 0], target))
    with pytest.raises(ValueError, match="one more"):
        loss(torch.randn(2, 3, 8, 8), target)


def _fails(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in err, err[-3000:]


def test_missing_modality_is_a_clear_error(brats_dir, tmp_path):
    data = shutil.copytree(brats_dir, tmp_path / "data")
    missing = data / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    missing.unlink()
    proc = _run(("train",), data, tmp_path / "run", check=False)
    _fails(proc, f"InputDataError: {data / 'BraTS2021_00002'}: case BraTS2021_00002 lacks {missing} (the T2 modality)")
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def _parser(config: str, data: Path, out: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CFG / f"{config}.json"))
    parser.update({"dataset_dir": str(data), "output_dir": str(out), "bundle_root": str(BUNDLE)})
    return parser


def test_mismatched_modality_shapes_are_a_clear_error_before_any_output(tmp_path):
    """The bundle's own datalist (inference.json) rejects a case whose modalities differ in shape, from the headers,
    before anything is loaded or written (in-process: the CLI path is the one of the missing-modality test)."""
    data = make_brats_dataset(tmp_path / "data", cases=0, test=2, size=(32, 32, 32), seed=1)
    bad = data / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 30), np.int16), nib.load(bad).affine), bad)
    parser = _parser("inference", data, tmp_path / "out")
    parser.get_parsed_content("datalists").start()  # what the config's run does first
    with pytest.raises(InputDataError) as e:
        len(parser.get_parsed_content("datalist"))  # the datalist is read when the run uses it
    assert str(e.value).startswith(f"{bad}: shape (32, 32, 30) does not match {data / 'BraTS2021_00001'}")
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_unknown_label_value_is_a_clear_error(tmp_path):
    """train.json's preprocessing rejects a BraTS label map with a value outside the case's convention."""
    data = make_brats_dataset(tmp_path / "data", cases=2, size=(32, 32, 32), seed=2)
    seg = data / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    img = nib.load(seg)
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(label, img.affine), seg)
    parser = _parser("train", data, tmp_path / "out")
    item = next(x for x in parser.get_parsed_content("datalists")["training"] + parser.get_parsed_content(
        "datalists")["validation"] if x["case"] == "BraTS2021_00001")
    with pytest.raises(RuntimeError) as e:
        parser.get_parsed_content("validate#preprocessing")(item)
    cause = e.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, InputDataError)
    assert str(cause).startswith(f"{seg}: label values [5] are not among the expected [0, 1, 2, 4]")


def test_gradient_accumulation_is_the_papers_batch_of_two():
    """train.json trains with batch 1 and ``gradient_accumulation`` 2 (to fit a 24 GB machine, e.g. from MONAI
    Label): with the bundle's own network and loss, one epoch of two accumulated steps makes the same update as one
    step on a batch of two (GLIMS normalises per sample: instance and group norms). Plain SGD makes the update the
    gradient itself: Adam would turn float noise in gradients that vanish (conv biases before an instance norm) into
    full-size steps and hide the comparison. In float64: in float32 the two summation orders differ by ~0.5% in the
    gradients of the first layers (instance norms over small maps amplify rounding), in float64 by ~1e-15."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    parser = ConfigParser()
    parser.read_config(str(CFG / "train.json"))
    parser.update({"network_def#feature_size": 3, "network_def#img_size": [32, 32, 32]})
    assert parser.get_parsed_content("batch_size") == 1 and parser.get_parsed_content("gradient_accumulation") == 2
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(4, 32, 32, 32, generator=g, dtype=torch.float64),
             "label": (torch.rand(3, 32, 32, 32, generator=g) > 0.7).double()} for _ in range(2)]

    def train(batch_size: int, accumulation: int) -> dict:
        torch.manual_seed(1)
        net = parser.get_parsed_content("network_def", instantiate=True, lazy=False).double()
        loss = parser.get_parsed_content("loss", instantiate=True, lazy=False)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, network=net, optimizer=opt, loss_function=loss,
                          train_data_loader=DataLoader(data, batch_size=batch_size, shuffle=False),
                          accumulation_steps=accumulation).run()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    one_batch = train(2, 1)
    accumulated = train(1, parser.get_parsed_content("gradient_accumulation"))
    torch.manual_seed(1)
    initial = parser.get_parsed_content("network_def", instantiate=True, lazy=False).double().state_dict()
    moved = [k for k in one_batch if not torch.equal(one_batch[k], initial[k])]
    assert len(moved) > 100  # the step did train the network
    for k in one_batch:
        torch.testing.assert_close(accumulated[k], one_batch[k], rtol=1e-9, atol=1e-12, msg=k)
