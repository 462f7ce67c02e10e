"""The DALight-3D bundle run end to end through ``python -m monai.bundle`` on generated data (CPU)."""

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
from medseg_nets.runtime import available_runtimes

BUNDLE = ROOT / "bundles" / "dalight3d"
CFG = BUNDLE / "configs"
# small patches and no workers keep CI fast; everything else is the bundle's own configuration
FAST = ["--roi_size", "[16,16,16]", "--num_workers", "0", "--val_fraction", "0.5", "--sw_batch_size", "2"]


def _train_args(msd_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["run", "--config_file", str(CFG / "train.json"), "--meta_file", str(CFG / "metadata.json"),
            "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(msd_dir), "--bundle_root", str(root),
            *FAST, *extra]


@pytest.fixture(scope="module")
def trained(msd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dalight3d_run")
    proc = run_cli(_train_args(msd_dir, root, "--epochs", "1"))
    return root, proc


def test_train_writes_checkpoints_metrics_split_and_logs(trained, msd_dir):
    root, proc = trained
    ckpt = torch.load(root / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2  # 2 training cases, batch 1
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(ckpt["network"])
    report = json.loads((root / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2
    assert set(report["summary"]["val_region_dice"]) == {"WT", "TC", "ET"}
    assert set(report["summary"]["val_label_hd95"]) == {"edema", "non_enhancing", "enhancing"}
    split = json.loads((root / "eval" / "datalist_split.json").read_text())
    names = {Path(x["image"]).name for x in split["training"] + split["validation"]}
    assert len(split["training"]) == 2 and len(split["validation"]) == 2 and len(names) == 4
    assert {Path(c["image"]).name for c in report["cases"]} == {Path(x["image"]).name for x in split["validation"]}
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    out = proc.stdout + proc.stderr
    assert "train_loss" in out and "loss=" in out  # per-iteration log line and progress bar


def test_resume_continues_from_last_epoch(trained, msd_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    before = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    proc = run_cli(_train_args(msd_dir, root, "--epochs", "2", "--resume", "true",
                               "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")))
    out = proc.stdout + proc.stderr
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in out
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in out  # epoch 1 was not trained again
    assert_resumed(tmp_path / "models", before, out)


def test_resume_without_checkpoint_is_a_clear_error(msd_dir, tmp_path):
    proc = run_cli(_train_args(msd_dir, tmp_path, "--epochs", "1", "--resume", "true"), check=False)
    assert proc.returncode != 0
    assert f"resume requested but {tmp_path}/models/checkpoint_latest.pt does not exist" in proc.stderr


def test_evaluate_reports_regions_labels_and_hd95(trained, msd_dir, tmp_path):
    root, _ = trained
    run_cli(["run", "--config_file", f"['{CFG / 'train.json'}','{CFG / 'evaluate.json'}']",
             "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
             "--dataset_dir", str(msd_dir), "--bundle_root", str(root), "--output_dir", str(tmp_path), *FAST])
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_cases"] == 2
    for metric in ("val_region_dice", "val_label_dice"):
        for stats in report["summary"][metric].values():
            assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
    assert "val_region_hd95" in report["key_metrics"] and "val_region_dice" in report["key_metrics"]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("image,val_region_dice/WT") and len(rows) == 3
    assert "| val_region_dice | WT | TC | ET |" in (tmp_path / "metrics.md").read_text()
    assert not (root / "models" / "model.pt.partial").exists()


def test_inference_writes_label_maps_in_input_space(trained, msd_dir, tmp_path):
    root, _ = trained
    run_cli(["run", "--config_file", str(CFG / "inference.json"), "--meta_file", str(CFG / "metadata.json"),
             "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(msd_dir),
             "--bundle_root", str(root), "--output_dir", str(tmp_path), "--roi_size", "[16,16,16]",
             "--num_workers", "0", "--ckpt_path", str(root / "models" / "model.pt")])
    inputs = sorted((msd_dir / "imagesTs").glob("*.nii.gz"))
    assert len(inputs) == 2
    for src in inputs:
        out = tmp_path / src.name.replace(".nii.gz", "_seg.nii.gz")
        assert out.is_file(), f"no prediction for {src.name}: {sorted(p.name for p in tmp_path.iterdir())}"
        a, b = nib.load(src), nib.load(out)
        assert b.shape == a.shape[:3]
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
        assert b.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(b.dataobj))) <= {0, 1, 2, 3}
        assert b.header["qform_code"] == a.header["qform_code"] and b.header["sform_code"] == a.header["sform_code"]
    assert not list(tmp_path.glob(".*partial*"))


def test_missing_checkpoint_is_a_clear_error(msd_dir, tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    proc = run_cli(["run", "--config_file", str(CFG / "inference.json"), "--dataset_dir", str(msd_dir),
                    "--bundle_root", str(BUNDLE), "--output_dir", str(tmp_path / "out"),
                    "--ckpt_path", str(missing), "--num_workers", "0"], check=False)
    assert proc.returncode != 0
    assert f"checkpoint {missing} not found: train the bundle first" in proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_torchrun_two_cpu_processes(msd_dir, tmp_path):
    proc = run_cli(["run", "--config_file", f"['{CFG / 'train.json'}','{CFG / 'multi_gpu_train.json'}']",
                    "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
                    "--dataset_dir", str(msd_dir), "--bundle_root", str(tmp_path), "--epochs", "1", *FAST],
                   torchrun=2)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 1  # 2 training cases shared by 2 ranks
    assert not any(k.startswith("module.") for k in ckpt["network"])  # saved unwrapped from DDP
    report = json.loads((tmp_path / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2  # one validation case per rank, gathered
    assert "gloo" in (proc.stdout + proc.stderr) or torch.distributed.is_gloo_available()


def test_model_zoo_checks_and_torchscript_export():
    """Required files, metadata, workflow properties, verify_net_in_out, ckpt_export equal to eager."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "verify_bundle.py"), str(BUNDLE)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for check in ("files", "metadata", "properties", "verify_net_in_out", "ckpt_export"):
        assert f"PASS dalight3d: {check}" in proc.stdout


@pytest.mark.skipif("openvino" not in available_runtimes(), reason="openvino not installed (pip install -e '.[dev]')")
def test_inference_runtime_openvino_matches_eager(trained, msd_dir, tmp_path):
    """``--runtime openvino``: the network is exported once (cached beside the checkpoint, reused by the next run),
    checked against eager PyTorch, and the label maps are those of the default eager run."""
    root, _ = trained
    ckpt = tmp_path / "weights" / "model.pt"
    ckpt.parent.mkdir()
    shutil.copy(root / "models" / "model.pt", ckpt)

    def infer(out: str, *extra: str):
        return run_cli(["run", "--config_file", str(CFG / "inference.json"), "--meta_file", str(CFG / "metadata.json"),
                        "--logging_file", str(CFG / "logging.conf"), "--dataset_dir", str(msd_dir),
                        "--bundle_root", str(root), "--output_dir", str(tmp_path / out), "--roi_size", "[16,16,16]",
                        "--num_workers", "0", "--ckpt_path", str(ckpt), *extra])

    infer("eager")
    first = infer("ov", "--runtime", "openvino")
    log = first.stdout + first.stderr
    assert "unavailable, running" not in log and "eager PyTorch for this call" not in log, log[-3000:]
    assert "RuntimeNetwork: exporting DALight3D" in log and "within" in log
    cached = ckpt.parent / "model.pt.4x16x16x16.onnx"
    assert cached.is_file() and cached.with_suffix(".json").is_file()
    second = infer("ov2", "--runtime", "openvino")
    log2 = second.stdout + second.stderr
    assert "exporting" not in log2 and "(cached export" in log2, log2[-3000:]
    for src in sorted((msd_dir / "imagesTs").glob("*.nii.gz")):
        name = src.name.replace(".nii.gz", "_seg.nii.gz")
        ref = np.asarray(nib.load(tmp_path / "eager" / name).dataobj)
        for out in ("ov", "ov2"):
            pred = nib.load(tmp_path / out / name)
            assert pred.shape == ref.shape
            # logits within 1e-4 of the range: an argmax may flip only where two classes tie to that precision
            assert np.mean(np.asarray(pred.dataobj) != ref) <= 1e-3
