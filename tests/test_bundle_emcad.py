"""The EMCAD bundle (2D PVT-EMCAD on axial slices of BraTS volumes) end to end through ``python -m monai.bundle``.

Generated BraTS case folders (tiny 32x32x16 volumes), PVTv2-B0 encoder and 64x64 slices keep it fast on CPU;
everything else is the bundle's own configuration.
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
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.inferers import SliceInferer

from conftest import ROOT, assert_resumed, run_cli
from make_demo_data import make_brats_dataset

from medseg_nets import InputDataError
from medseg_nets.utils import input_errors
from medseg_nets.nets.pvtv2 import adapt_input_conv_weight, pvt_v2_b0
from medseg_nets.transforms.slices import (
    in_plane_axes,
    in_plane_range,
    slice_roi_size,
    slice_rotate_range,
    slice_sigma_scale,
)

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")

BUNDLE = ROOT / "bundles" / "emcad"
CFG = BUNDLE / "configs"
META = ["--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf")]
NET = ["--network_def#encoder", "pvt_v2_b0", "--roi_size", "[64,64]", "--slice_batch", "16", "--num_workers", "0"]
# 2 training volumes x 1 volume per batch = 2 iterations per epoch, 2 slices drawn from each volume
FAST = [*NET, "--val_fraction", "0.5", "--val_interval", "1", "--batch_size", "1", "--num_samples", "2"]
SIZE = (32, 32, 16)
# the same overrides for configs run in this process (monai.bundle.run: what `python -m monai.bundle run` calls)
NET_KW = {"network_def#encoder": "pvt_v2_b0", "roi_size": [64, 64], "slice_batch": 16, "num_workers": 0}
FAST_KW = {**NET_KW, "val_fraction": 0.5, "val_interval": 1, "batch_size": 1, "num_samples": 2}


def _run_here(config_file: str | list[str], **overrides) -> None:
    """Run a bundle config in this process (train/resume/torchrun go through the command line; evaluation and
    inference here, which saves two interpreter starts). The bundle's logging.conf is not applied to pytest."""
    bundle_run(config_file=config_file, meta_file=str(CFG / "metadata.json"), logging_file=False, **overrides)


def _train_args(data: Path, root: Path, *extra: str) -> list[str]:
    return ["run", "--config_file", str(CFG / "train.json"), *META, "--dataset_dir", str(data),
            "--bundle_root", str(root), *FAST, *extra]


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory) -> Path:
    """4 labelled BraTS 2020 cases (2 training / 2 validation with val_fraction 0.5)."""
    root = tmp_path_factory.mktemp("emcad_data") / "BraTS2020"
    return make_brats_dataset(root, cases=4, size=SIZE, convention="2020")


@pytest.fixture(scope="module")
def trained(brats_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("emcad_run")
    proc = run_cli(_train_args(brats_dir, root, "--epochs", "1"))
    return root, proc


def test_train_writes_checkpoints_metrics_split_and_logs(trained):
    root, proc = trained
    ckpt = torch.load(root / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2
    assert ckpt["lr_scheduler"]["base_lrs"] == [1e-4] and ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-4
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(ckpt["network"])
    assert weights["heads.3.weight"].shape == (3, 32, 1, 1)  # B0's shallowest head -> TC, WT, ET
    assert weights["encoder.patch_embed1.proj.weight"].shape == (32, 4, 7, 7)  # 4 sequences in the patch embedding
    report = json.loads((root / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2
    assert set(report["summary"]["val_region_dice"]) == set(report["summary"]["val_region_hd95"]) == {"TC", "WT", "ET"}
    split = json.loads((root / "eval" / "datalist_split.json").read_text())
    assert len(split["training"]) == 2 and len(split["validation"]) == 2
    assert {x["case"] for x in split["validation"]} == {Path(c["image"]).parent.name for c in report["cases"]}
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    out = proc.stdout + proc.stderr
    assert "train_loss" in out and "loss=" in out  # per-iteration log line and progress bar


def test_resume_continues_from_last_epoch(trained, brats_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    before = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    proc = run_cli(_train_args(brats_dir, root, "--epochs", "2", "--resume", "true",
                               "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")))
    out = proc.stdout + proc.stderr
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in out
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in out  # epoch 1 was not trained again
    assert_resumed(tmp_path / "models", before, out)


def test_evaluate_reports_per_region_dice_and_hd95_on_the_validation_cases(trained, brats_dir, tmp_path):
    root, _ = trained
    _run_here([str(CFG / "train.json"), str(CFG / "evaluate.json")], dataset_dir=str(brats_dir), bundle_root=str(root),
              output_dir=str(tmp_path), **FAST_KW)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_cases"] == 2
    for stats in report["summary"]["val_region_dice"].values():
        assert stats["mean"] is None or 0.0 <= stats["mean"] <= 1.0
    assert {"val_region_dice", "val_region_hd95"} <= set(report["key_metrics"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "image,val_region_dice/TC,val_region_dice/WT,val_region_dice/ET,val_region_hd95/TC," \
                      "val_region_hd95/WT,val_region_hd95/ET" and len(rows) == 3
    assert "| val_region_dice | TC | WT | ET |" in (tmp_path / "metrics.md").read_text()
    # the same seeded split as training (and as the 3D BraTS bundles with the same seed and val_fraction)
    split = json.loads((tmp_path / "datalist_split.json").read_text())
    assert {x["case"] for x in split["validation"]} == {Path(c["image"]).parent.name for c in report["cases"]}


def _rewrite_case(folder: Path, affine: np.ndarray, transpose: tuple[int, int, int]) -> None:
    for f in folder.glob("*.nii.gz"):
        img = nib.load(f)
        data = np.transpose(np.asarray(img.dataobj), transpose)
        nib.save(nib.Nifti1Image(data, affine, header=None), f)


@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory) -> Path:
    """Two unlabelled cases: BraTS 2023 naming (labels 0/1/2/3) and BraTS 2021 naming (0/1/2/4), the latter with a
    permuted, flipped, translated affine (axial slices along the file's first axis)."""
    root = tmp_path_factory.mktemp("emcad_infer") / "cases"
    make_brats_dataset(root, cases=0, test=1, size=SIZE, convention="2023", seed=3)
    make_brats_dataset(root, cases=0, test=1, size=SIZE, convention="2021", seed=4, first_index=7)
    affine = np.array([[0, 0, -1.0, 80.0], [0, 1.0, 0, -100.0], [1.0, 0, 0, -20.0], [0, 0, 0, 1]])
    _rewrite_case(root / "BraTS2021_00007", affine, (2, 1, 0))
    return root


def test_inference_writes_3d_label_maps_in_input_space_and_convention(trained, unlabelled_dir, tmp_path):
    root, _ = trained
    # a network whose shallowest head says "TC, WT and ET" everywhere: the written labels must be the input's ET value
    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    weights["heads.3.weight"].zero_()
    weights["heads.3.bias"].fill_(20.0)
    ckpt = tmp_path / "all_et.pt"
    torch.save(weights, ckpt)
    out_dir = tmp_path / "pred"
    _run_here(str(CFG / "inference.json"), dataset_dir=str(unlabelled_dir), bundle_root=str(root),
              output_dir=str(out_dir), ckpt_path=str(ckpt), **NET_KW)
    for case, et in (("BraTS-GLI-00000-000", 3), ("BraTS2021_00007", 4)):
        flair = next((unlabelled_dir / case).glob("*-t2f.nii.gz" if et == 3 else "*_flair.nii.gz"))
        out = out_dir / f"{case}_seg.nii.gz"
        assert out.is_file(), f"no prediction for {case}: {sorted(p.name for p in out_dir.iterdir())}"
        a, b = nib.load(flair), nib.load(out)
        assert b.shape == a.shape and b.get_data_dtype() == np.uint8
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
        assert b.header["qform_code"] == a.header["qform_code"] and b.header["sform_code"] == a.header["sform_code"]
        pred = np.asarray(b.dataobj)
        assert set(np.unique(pred)) == {0, et}
        # ET exactly in the bounding box of the head (CropForegroundd inverted), 0 outside
        fg = np.zeros(a.shape, bool)
        for f in (unlabelled_dir / case).glob("*.nii.gz"):
            fg |= np.asarray(nib.load(f).dataobj) > 0
        box = np.zeros(a.shape, bool)
        box[tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(fg))] = True
        np.testing.assert_array_equal(pred == et, box)
    assert not list(out_dir.glob(".*partial*")) and not list(out_dir.glob("*.partial"))


def test_torchrun_two_cpu_processes(brats_dir, tmp_path):
    run_cli(["run", "--config_file", f"['{CFG / 'train.json'}','{CFG / 'multi_gpu_train.json'}']", *META,
             "--dataset_dir", str(brats_dir), "--bundle_root", str(tmp_path), "--epochs", "1", *FAST], torchrun=2)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_latest.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 1  # 2 training volumes shared by 2 ranks
    assert not any(k.startswith("module.") for k in ckpt["network"])  # saved unwrapped from DDP
    report = json.loads((tmp_path / "eval" / "val_metrics.json").read_text())
    assert report["n_cases"] == 2  # one validation volume per rank, gathered


def _parse(config: str | list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config)
    parser.read_meta(str(CFG / "metadata.json"))
    parser.update(overrides)
    return parser


def _official_checkpoint(path: Path, state: dict[str, torch.Tensor], wrap: bool) -> None:
    """Save ``state`` as an ImageNet checkpoint in the official PVTv2 layout (plus the 1000-class ``head``)."""
    dim = state["norm4.weight"].shape[0]
    full = {**state, "head.weight": torch.randn(1000, dim), "head.bias": torch.randn(1000)}
    torch.save({"model": full} if wrap else full, path)


def _instantiation_error(parser: ConfigParser, key: str) -> BaseException:
    """The error raised while instantiating ``key`` (MONAI wraps it in a RuntimeError naming the component)."""
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content(key)
    return info.value.__cause__ or info.value


def test_pretrained_pvtv2_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in pvt_v2_b0().state_dict().items()}  # 3-channel ImageNet encoder
    _official_checkpoint(tmp_path / "pvt_v2_b0.pth", state, wrap=False)
    assert _parse(str(CFG / "train.json"))["pretrained_path"] is None  # no pretrained weights by default
    parser = _parse(str(CFG / "train.json"), **{"network_def#encoder": "pvt_v2_b0",
                                                 "pretrained_path": str(tmp_path / "pvt_v2_b0.pth")})
    enc = parser.get_parsed_content("network_def").encoder.state_dict()
    assert set(enc) == set(state)
    for key, value in state.items():
        expected = adapt_input_conv_weight(value, 4) if key == "patch_embed1.proj.weight" else value
        torch.testing.assert_close(enc[key], expected, msg=key)
    assert enc["patch_embed1.proj.weight"].shape == (32, 4, 7, 7)
    # a checkpoint that does not fit (here: another variant's keys) is refused with the keys listed
    bad = {k: v for k, v in state.items() if k != "norm4.bias"}
    bad["block1.2.attn.q.weight"] = state["block1.1.attn.q.weight"]
    _official_checkpoint(tmp_path / "other.pth", bad, wrap=True)
    parser = _parse(str(CFG / "train.json"), **{"network_def#encoder": "pvt_v2_b0",
                                                 "pretrained_path": str(tmp_path / "other.pth")})
    err = str(_instantiation_error(parser, "network_def"))
    assert "other.pth" in err and "missing keys (1): norm4.bias" in err
    assert "unexpected keys (1): block1.2.attn.q.weight" in err


def test_slice_sampling_gives_tumour_biased_one_slice_volumes(brats_dir, tmp_path):
    assert slice_roi_size([256, 256], 2) == [256, 256, 1] and slice_roi_size([64, 48], 0) == [1, 64, 48]
    with pytest.raises(ValueError):
        slice_roi_size([256, 256, 1], 2)
    # in-plane augmentation of one-slice volumes: flips along the two other axes, rotation about the slice axis only
    # (MONAI's i-th 3D angle rotates about axis i), no scaling across slices
    assert in_plane_axes(2) == [0, 1] and in_plane_axes(0) == [1, 2] and in_plane_axes(1) == [0, 2]
    assert slice_rotate_range(0.3, 2) == [0.0, 0.0, 0.3] and slice_rotate_range(0.3, 0) == [0.3, 0.0, 0.0]
    assert in_plane_range(0.1, 2) == [0.1, 0.1, 0.0] and in_plane_range(0.1, 1) == [0.1, 0.0, 0.1]
    with pytest.raises(ValueError):
        in_plane_axes(3)
    parser = _parse(str(CFG / "train.json"), dataset_dir=str(brats_dir), output_dir=str(tmp_path), roi_size=[64, 64],
                    num_samples=4, pos_neg_ratio=[1, 0], num_workers=0, rotate_range=0.0, scale_range=0.0)
    item = parser.get_parsed_content("datalists")["training"][0]
    samples = parser.get_parsed_content("train#preprocessing").set_random_state(seed=0)(item)
    assert len(samples) == 4
    for s in samples:
        # one axial slice each, kept as a volume of depth 1 for the slice-wise network; TC/WT/ET targets
        assert s["image"].shape == (4, 64, 64, 1) and s["label"].shape == (3, 64, 64, 1)
        assert s["label"][1].sum() > 0  # pos:neg 1:0 -> every slice shows tumour (WT)
        assert bool((s["label"][0] <= s["label"][1]).all()) and bool((s["label"][2] <= s["label"][0]).all())


def test_volume_inference_equals_the_slice_inferer_it_replaces():
    """inference.json (and the validation of train.json) run the volume through the slice-wise network in in-plane
    windows of roi_size holding every slice; version 0.1.2 ran the 2D network with MONAI's SliceInferer. Same
    windows, same padding, same blending: the same logits (bit for bit when a plane fits one window, where both batch
    the same slices; up to the round-off of differently batched kernels when the plane is tiled)."""
    assert slice_roi_size([64, 48], 2, depth=-1) == [64, 48, -1] and slice_roi_size([64, 48], 0, -1) == [-1, 64, 48]
    assert slice_sigma_scale(0.125, 2) == [0.125, 0.125, float("inf")]
    with pytest.raises(ValueError):
        slice_roi_size([64, 64], 2, depth=0)
    torch.manual_seed(0)
    for config in (str(CFG / "inference.json"), str(CFG / "train.json")):
        parser = _parse(config, **{"network_def#encoder": "pvt_v2_b0", "roi_size": [64, 64]})
        net = parser.get_parsed_content("network_def").eval()
        inferer = parser.get_parsed_content("inferer" if "inference" in config else "validate#inferer")
        before = SliceInferer(roi_size=[64, 64], spatial_dim=2, sw_batch_size=32, overlap=0.25, mode="gaussian")
        for shape in ((1, 4, 40, 50, 5), (1, 4, 90, 70, 3)):  # padded to the roi; tiled by overlapping windows
            x = torch.randn(shape)
            with torch.no_grad():
                y = inferer(x, net)
                assert y.shape == (1, 3, *shape[2:])
                expected = before(x, net)
            if shape[2] <= 64 and shape[3] <= 64:
                assert torch.equal(y, expected), (config, shape)
            else:
                torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_missing_modality_is_a_clear_error_before_any_output(brats_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(brats_dir, data)
    missing = next(data.glob("*/*_t1ce.nii.gz"))
    missing.unlink()
    for config, key in ((str(CFG / "train.json"), "train#dataset"), (str(CFG / "inference.json"), "dataset")):
        parser = _parse(config, dataset_dir=str(data), output_dir=str(tmp_path / "out"))
        parser.get_parsed_content("datalists").start()  # what the config's run does first
        with pytest.raises(Exception) as info:  # the datasets read the data when the run uses them
            len(parser.get_parsed_content(key))
        assert any(f"lacks {missing} (the T1CE modality)" in m for m in input_errors(info.value)), info.value
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_zoo_checks_and_torchscript_export():
    """Required files, metadata, workflow properties, verify_net_in_out (2D, 4 x 64 x 64), ckpt_export."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "verify_bundle.py"), str(BUNDLE), "--n", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for check in ("files", "metadata", "properties", "verify_net_in_out", "ckpt_export"):
        assert f"PASS emcad: {check}" in proc.stdout
