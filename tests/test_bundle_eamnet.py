"""The EAM-Net skin-lesion bundle end to end on generated ISIC 2018 / PH2 data (CPU).

Training, ISIC inference and torchrun go through ``python -m monai.bundle`` as a user runs them; the other runs
(resume, evaluation and inference on PH2, error cases, zoo checks) use the same configs in-process
(``monai.bundle.run``), which saves a Python start-up and MONAI import per run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run
from PIL import Image

from conftest import ROOT, assert_resumed, run_cli
from make_demo_data import make_skin_dataset
from medseg_nets import InputDataError

BUNDLE = ROOT / "bundles" / "eamnet"
CFG = BUNDLE / "configs"
# 64x64 inputs, narrow widths (the full-size network is checked by the zoo checks and tests/test_net_eamnet.py),
# batch 1 and no workers keep CI fast; everything else is the bundle's own configuration
NARROW = [8, 16, 32, 64, 64]
FAST_KW = {"image_size": [64, 64], "num_workers": 0, "val_fraction": 0.5, "batch_size": 1, "val_batch_size": 1,
           "network_def#features": NARROW}
FAST = [a for k, v in FAST_KW.items() for a in (f"--{k}", json.dumps(v).replace(" ", ""))]
METRICS = ("val_dice", "val_iou", "val_accuracy", "val_precision", "val_sensitivity", "val_specificity")


@pytest.fixture(scope="module")
def isic_dir(tmp_path_factory) -> Path:
    """4 labelled cases (2 training, 2 validation) and 1 unlabelled test image, of different, non-square sizes."""
    return make_skin_dataset(tmp_path_factory.mktemp("isic") / "ISIC2018", cases=4, size=(56, 76), seed=0, test=1)


@pytest.fixture(scope="module")
def ph2_dir(tmp_path_factory) -> Path:
    return make_skin_dataset(tmp_path_factory.mktemp("ph2") / "PH2", cases=3, size=(50, 66), seed=1, layout="ph2")


def _train_args(data: Path, root: Path, *extra: str) -> list[str]:
    return ["run", "--config_file", str(CFG / "train.json"), "--meta_file", str(CFG / "metadata.json"),
            "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(data), "--bundle_root", str(root),
            *FAST, *extra]


def _run_inprocess(configs: list[str], **overrides) -> None:
    files = [str(CFG / c) for c in configs]
    # logging_file=False: the bundle's logging.conf would replace the test process's logging set-up
    bundle_run(config_file=files if len(files) > 1 else files[0], meta_file=str(CFG / "metadata.json"),
               logging_file=False, **overrides)


def _cause(err: BaseException, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


@pytest.fixture(scope="module")
def trained(isic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eamnet_run")
    proc = run_cli(_train_args(isic_dir, root, "--epochs", "1"))
    return root, proc


def test_train_writes_checkpoints_metrics_split_and_logs(trained):
    root, proc = trained
    ckpt = torch.load(root / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2  # 2 training cases, batch 1
    assert ckpt["lr_scheduler"]["T_0"] == 10 and ckpt["lr_scheduler"]["T_mult"] == 2
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(ckpt["network"])
    report = json.loads((root / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2
    assert set(report["summary"]) == set(METRICS)
    for m in METRICS + tuple(m.replace("val_", "val_pooled_") for m in METRICS):
        assert m in report["key_metrics"]
    split = json.loads((root / "eval" / "datalist_split.json").read_text())
    assert split["dataset_format"] == "isic2018"
    assert len(split["training"]) == 2 and len(split["validation"]) == 2 and len(split["test"]) == 5
    assert {Path(c["image"]).name for c in report["cases"]} == {Path(x["image"]).name for x in split["validation"]}
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    out = proc.stdout + proc.stderr
    assert "train_loss" in out and "loss=" in out  # per-iteration log line and progress bar
    rows = (root / "eval" / "val_metrics.csv").read_text().splitlines()
    assert rows[0] == "image," + ",".join(f"{m}/lesion" for m in METRICS) and len(rows) == 3


def test_resume_continues_from_last_epoch(trained, isic_dir, tmp_path, caplog):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    before = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    with caplog.at_level(logging.INFO):
        _run_inprocess(["train.json"], dataset_dir=str(isic_dir), bundle_root=str(root), epochs=2, resume="true",
                       ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), **FAST_KW)
    assert "Epoch[2] Complete" in caplog.text and "Epoch[1] Complete" not in caplog.text.replace(
        "SupervisedEvaluator - INFO - Epoch[1] Complete", "")  # the trainer did not repeat epoch 1
    assert_resumed(tmp_path / "models", before, caplog.text)


def test_inference_writes_png_masks_and_overlays_at_input_size(trained, isic_dir, tmp_path):
    root, _ = trained
    run_cli(["run", "--config_file", str(CFG / "inference.json"), "--meta_file", str(CFG / "metadata.json"),
             "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(isic_dir),
             "--bundle_root", str(root), "--output_dir", str(tmp_path), "--image_size", "[64,64]",
             "--num_workers", "0", "--network_def#features", json.dumps(NARROW).replace(" ", ""),
             "--save_overlay", "true", "--ckpt_path", str(root / "models" / "model.pt")])
    inputs = sorted(isic_dir.rglob("ISIC_???????.jpg"))
    assert len(inputs) == 5  # 4 labelled + 1 test image without a mask
    for src in inputs:
        out = tmp_path / f"{src.stem}_seg.png"
        assert out.is_file(), f"no prediction for {src.name}: {sorted(p.name for p in tmp_path.iterdir())}"
        mask, image = Image.open(out), Image.open(src)
        assert mask.mode == "L" and mask.size == image.size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = Image.open(tmp_path / f"{src.stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == image.size
    assert not list(tmp_path.glob(".*partial*"))


def test_ph2_evaluation_and_inference(trained, ph2_dir, tmp_path):
    """Cross-dataset use: the ISIC-trained weights evaluated on every labelled PH2 case, then PH2 inference."""
    root, _ = trained
    _run_inprocess(["train.json", "evaluate.json"], dataset_dir=str(ph2_dir), dataset_format="ph2",
                   bundle_root=str(root), output_dir=str(tmp_path / "eval"),
                   **{"validate#dataset#data": "$@datalists['labelled']"}, **FAST_KW)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["n_cases"] == 3
    assert sorted(Path(c["image"]).name for c in report["cases"]) == ["IMD002.bmp", "IMD003.bmp", "IMD004.bmp"]
    for m in METRICS:
        stats = report["summary"][m]["lesion"]
        assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
    assert "| val_dice | lesion |" in (tmp_path / "eval" / "metrics.md").read_text()

    _run_inprocess(["inference.json"], dataset_dir=str(ph2_dir), bundle_root=str(root),
                   output_dir=str(tmp_path / "pred"), image_size=[64, 64], num_workers=0,
                   **{"network_def#features": NARROW})
    for src in sorted(ph2_dir.rglob("IMD???.bmp")):
        mask = Image.open(tmp_path / "pred" / f"{src.stem}_seg.png")
        assert mask.size == Image.open(src).size
    assert not list((tmp_path / "pred").glob("*_overlay.png"))  # save_overlay defaults to false


def test_bad_mask_stops_training_before_any_checkpoint(isic_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(isic_dir, data)
    mask = data / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000001_segmentation.png"
    grey = np.asarray(Image.open(mask)).copy()
    grey[grey > 0] = 128  # a soft mask: not the 0/255 the format promises
    Image.fromarray(grey).save(mask)
    with pytest.raises(Exception) as info:
        _run_inprocess(["train.json"], dataset_dir=str(data), bundle_root=str(tmp_path / "run"), epochs=1, **FAST_KW)
    err = _cause(info.value, InputDataError)
    assert err is not None and str(mask) in str(err) and "[0, 255]" in str(err)
    assert not list((tmp_path / "run" / "models").glob("*.pt"))


def test_missing_checkpoint_is_a_clear_error(isic_dir, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(Exception) as info:
        _run_inprocess(["inference.json"], dataset_dir=str(isic_dir), bundle_root=str(BUNDLE),
                       output_dir=str(tmp_path / "out"), ckpt_path=str(missing), num_workers=0)
    assert f"checkpoint {missing} not found: train the bundle first" in str(_cause(info.value, FileNotFoundError))
    assert not list((tmp_path / "out").glob("*.png"))


def test_torchrun_two_cpu_processes(isic_dir, tmp_path):
    run_cli(["run", "--config_file", f"['{CFG / 'train.json'}','{CFG / 'multi_gpu_train.json'}']",
             "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
             "--dataset_dir", str(isic_dir), "--bundle_root", str(tmp_path), "--epochs", "1", *FAST], torchrun=2)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 1  # 2 training cases shared by 2 ranks
    assert not any(k.startswith("module.") for k in ckpt["network"])
    report = json.loads((tmp_path / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2  # one validation case per rank, gathered


def test_model_zoo_checks_and_torchscript_export():
    """Required files, metadata, workflow properties, verify_net_in_out, ckpt_export equal to eager (full size)."""
    from verify_bundle import verify

    lines: list[str] = []
    assert verify(BUNDLE, log=lines.append) == [], "\n".join(lines)
    for check in ("files", "metadata", "properties", "verify_net_in_out", "ckpt_export"):
        assert f"PASS eamnet: {check}" in lines
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "4,538,506" in readme and "256" in readme
    assert (BUNDLE / "LICENSE").read_text().lstrip().startswith("Apache License")
