"""The glims bundle with the authors' weights: inference_authors.json end to end (BraTS 2023 cases, one model and the
two-model ensemble) and the authors' post-processing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from make_demo_data import make_brats_dataset
from monai.inferers import sliding_window_inference
from scipy import ndimage

from medseg_nets import InputDataError
from medseg_nets.blocks.glims import relative_position_index
from medseg_nets.convert import convert_authors_state_dict
from medseg_nets.convert.glims import authors_keys, map_key
from medseg_nets.nets.glims import GLIMS
from medseg_nets.transforms import (
    GLIMSBraTSPostprocessd,
    SelectChannelsd,
    fill_enclosed,
    glims_brats_postprocess,
    relabel_small_components,
    threshold_regions_to_label,
)

CFG = ROOT / "bundles" / "glims" / "configs"
CONFIGS = "['{}','{}']".format(CFG / "inference.json", CFG / "inference_authors.json")
# a reference-sized network made small: feature size 6 (Swin widths 48, 96, 192 for 6, 12, 24 heads), 32^3 patches
FEATURE, ROI = 6, 32
SMALL = ["--network_def#feature_size", str(FEATURE), "--roi_size", f"[{ROI},{ROI},{ROI}]", "--num_workers", "0"]
MODALITIES_AUTHORS = ("-t2f", "-t1c", "-t1n", "-t2w")  # the authors' channel order: FLAIR, T1ce, T1, T2


def _authors_checkpoint(seed: int) -> dict:
    """A seeded GLIMS in the authors' checkpoint layout (their trainer's ``{"epoch", "best_acc", "state_dict"}``,
    their parameter names and relative-position-index buffers); output weights scaled so that the three regions
    and all labels occur."""
    torch.manual_seed(seed)
    net = GLIMS.authors_release(4, 3, FEATURE, img_size=ROI)
    with torch.no_grad():
        net.out.weight.mul_(8.0)
        net.out.bias.copy_(torch.tensor([-1.0, 1.0, -2.0]))
    ours = net.state_dict()
    index = relative_position_index([7, 7, 7], [7, 7, 7], torch.device("cpu"))
    authors = {}
    for key in authors_keys((2, 2, 6, 2)):
        authors[key] = ours[map_key(key)].clone()
    for key in [k for k in authors if ".blocks." in k and k.endswith("attn.qkv.weight")]:
        authors[key.replace("attn.qkv.weight", "attn.relative_position_index")] = index.clone()
    return {"epoch": 100, "best_acc": 0.9, "state_dict": authors}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Two authors' checkpoints converted to the bundle's layout (what tools/import_weights.py produces)."""
    root = tmp_path_factory.mktemp("glims_authors")
    paths = []
    for i, seed in enumerate((11, 12)):
        checkpoint = _authors_checkpoint(seed)
        torch.save(checkpoint, root / f"authors_fold{i}.pth")
        converted = convert_authors_state_dict("glims", torch.load(root / f"authors_fold{i}.pth", weights_only=True))
        torch.save(converted, root / f"model_{i}.pt")
        paths.append(root / f"model_{i}.pt")
    return root, paths


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """One unlabelled BraTS 2023 case, larger than a patch along two axes (several windows)."""
    return make_brats_dataset(tmp_path_factory.mktemp("brats23"), cases=0, test=1, size=(44, 40, 28), seed=3,
                              convention="2023")


def _expected(case_dir: Path, weights: list[Path]) -> np.ndarray:
    """The authors' test_BraTS.py recipe, written out here: modalities stacked FLAIR, T1ce, T1, T2, z-scored over
    non-zero voxels per channel, one sliding window per model (overlap 0.5, constant blending), logits averaged,
    then their post-processing."""
    case = case_dir.name
    image = np.stack([np.asarray(nib.load(case_dir / f"{case}{m}.nii.gz").dataobj, dtype=np.float32)
                      for m in MODALITIES_AUTHORS])
    for c in range(4):
        mask = image[c] != 0
        values = image[c][mask]
        image[c][mask] = (values - values.mean()) / values.std()
    x = torch.from_numpy(image)[None]
    logits = []
    for path in weights:
        net = GLIMS.authors_release(4, 3, FEATURE, img_size=ROI)
        net.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            logits.append(sliding_window_inference(x, (ROI,) * 3, 1, net.eval(), overlap=0.5, mode="constant"))
    mean = (sum(logits) / len(logits))[0]
    return glims_brats_postprocess(mean), torch.sigmoid(mean).numpy()


def _run(cases: Path, root: Path, out: Path, ckpt: Path, ckpt2: Path | None = None, check: bool = True):
    args = ["run", "--config_file", CONFIGS, "--dataset_dir", str(cases), "--bundle_root", str(root),
            "--output_dir", str(out), "--ckpt_path", str(ckpt), *SMALL]
    if ckpt2 is not None:
        args += ["--ckpt_path_2", str(ckpt2)]
    return run_cli(args, check=check)


def _written(out: Path, case: str) -> nib.Nifti1Image:
    files = [p for p in out.glob("*.nii.gz") if case in p.name]
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    return nib.load(files[0])


@pytest.mark.parametrize("ensemble", [False, True], ids=["one_model", "two_model_ensemble"])
def test_authors_inference_matches_their_recipe(imported, cases, tmp_path, ensemble):
    root, weights = imported
    weights = weights if ensemble else weights[:1]
    out = tmp_path / "out"
    _run(cases, root, out, *weights)
    case_dir = next(p for p in cases.iterdir() if p.is_dir())
    pred = _written(out, case_dir.name)
    flair = nib.load(case_dir / f"{case_dir.name}-t2f.nii.gz")
    assert pred.shape == flair.shape  # the input's grid: no reorientation, resampling or cropping
    np.testing.assert_allclose(pred.affine, flair.affine, atol=1e-5)
    assert pred.get_data_dtype() == np.uint8
    label = np.asarray(pred.dataobj)
    expected, probs = _expected(case_dir, weights)
    assert set(np.unique(expected).tolist()) == {0, 1, 2, 3}  # the fixture exercises every label
    # equal up to float32 rounding (summation order of the z-score and of the windows): a voxel may differ only
    # where a probability is within 1e-4 of its threshold
    near = np.any(np.abs(probs - np.array([0.6, 0.5, 0.6])[:, None, None, None]) < 1e-4, axis=0)
    differ = label != expected
    assert not np.any(differ & ~near), f"{np.count_nonzero(differ & ~near)} voxels differ away from the thresholds"
    assert np.count_nonzero(differ) <= 5
    if ensemble:  # the second model takes part: one model alone gives another result
        single, _ = _expected(case_dir, weights[:1])
        assert np.count_nonzero(single != expected) > 100


def test_authors_inference_missing_second_checkpoint(imported, cases, tmp_path):
    root, weights = imported
    out = tmp_path / "out"
    proc = _run(cases, root, out, weights[0], tmp_path / "fold4_missing.pt", check=False)
    assert proc.returncode != 0
    assert "fold4_missing.pt" in proc.stderr + proc.stdout
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_threshold_regions_to_label_inclusive_and_nested():
    probs = np.array([[0.6, 0.59, 0.0, 0.7], [0.5, 0.49, 0.9, 0.2], [0.0, 0.6, 0.0, 0.6]], dtype=np.float32)
    probs = probs.reshape(3, 4, 1, 1)
    label = threshold_regions_to_label(probs, (0.6, 0.5, 0.6))[:, 0, 0]
    # TC at >= 0.6 paints 1 over WT's 2; ET at >= 0.6 paints 3 even where WT is below its threshold
    assert label.tolist() == [1, 3, 2, 3]


def test_relabel_small_components_26_connected_size_and_confidence():
    label = np.zeros((12, 12, 12), np.uint8)
    prob = np.full(label.shape, 0.5, np.float32)
    label[1, 1, 1] = label[2, 2, 2] = 3  # diagonal neighbours: one 2-voxel component (26-connectivity)
    label[6:9, 6:9, 6:9] = 3  # 27 voxels, confident
    prob[6:9, 6:9, 6:9] = 0.95
    label[1:6, 8:11, 8:11] = 3  # 45 voxels, not confident -> relabelled
    relabel_small_components(label, prob, value=3, max_size=30, min_prob=0.9, new_value=1)
    assert label[1, 1, 1] == label[2, 2, 2] == 1
    assert (label[6:9, 6:9, 6:9] == 3).all()
    assert (label[1:6, 8:11, 8:11] == 3).all()  # 45 >= 30 voxels: kept


def test_fill_enclosed_holes_of_the_enhancing_region():
    label = np.zeros((9, 9, 9), np.uint8)
    label[1:8, 1:8, 1:8] = 3
    label[3:6, 3:6, 3:6] = 2  # enclosed oedema and background: holes -> NCR
    label[4, 4, 4] = 0
    fill_enclosed(label, 3, 1)
    assert (label[3:6, 3:6, 3:6] == 1).all()
    # a cavity reaching the border through a diagonal step only is connected to the outside (26-connectivity)
    label = np.zeros((7, 7, 7), np.uint8)
    label[:, :, :] = 3
    label[0, 0, 0] = 0
    label[1, 1, 1] = 0
    label[2, 2, 2] = 0
    label[4, 4, 4] = 0  # a true hole
    fill_enclosed(label, 3, 1)
    assert label[1, 1, 1] == 0 and label[2, 2, 2] == 0 and label[4, 4, 4] == 1


def _postprocess_loop(logits: np.ndarray) -> np.ndarray:
    """The authors' steps one component at a time (a second, independent reading of test_BraTS.py)."""
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    seg = np.zeros(p.shape[1:], np.uint8)
    seg[p[1] >= 0.5] = 2
    seg[p[0] >= 0.6] = 1
    seg[p[2] >= 0.6] = 3
    structure = np.ones((3, 3, 3), bool)
    for value, channel, size, new in ((3, 2, 75, 1), (1, 0, 75, 2), (2, 1, 500, 0)):
        cc, n = ndimage.label(seg == value, structure=structure)
        for i in range(1, n + 1):
            comp = cc == i
            if comp.sum() < size and p[channel][comp].mean() < 0.9:
                seg[comp] = new
    cc, n = ndimage.label(seg != 3, structure=structure)
    border = set(np.unique(np.concatenate([cc[0].ravel(), cc[-1].ravel(), cc[:, 0].ravel(), cc[:, -1].ravel(),
                                           cc[:, :, 0].ravel(), cc[:, :, -1].ravel()])).tolist())
    for i in range(1, n + 1):
        if i not in border:
            seg[cc == i] = 1
    return seg


def test_postprocess_matches_componentwise_reading():
    rng = np.random.default_rng(0)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 40, 40, 30)), sigma=(0, 2, 2, 2)) * 12
    logits = logits.astype(np.float32)
    ours = glims_brats_postprocess(torch.from_numpy(logits))
    assert np.array_equal(ours, _postprocess_loop(logits))
    assert set(np.unique(ours).tolist()) == {0, 1, 2, 3}


def test_postprocessd_convention_and_metadata():
    from monai.data import MetaTensor

    logits = MetaTensor(torch.full((3, 4, 4, 4), 5.0), meta={"filename_or_obj": "case-t2f.nii.gz"})
    out = GLIMSBraTSPostprocessd("pred", convention="auto")({"pred": logits, "brats_convention": "2021"})
    assert out["pred"].shape == (1, 4, 4, 4) and out["pred"].dtype == torch.uint8
    assert set(out["pred"].unique().tolist()) == {4}
    assert out["pred"].meta["filename_or_obj"] == "case-t2f.nii.gz"
    out = GLIMSBraTSPostprocessd("pred", convention="2023")({"pred": logits})
    assert set(out["pred"].unique().tolist()) == {3}


def test_select_channels():
    from monai.data import MetaTensor

    img = MetaTensor(torch.arange(4.0).view(4, 1, 1, 1), meta={"filename_or_obj": "x-t2f.nii.gz"})
    out = SelectChannelsd("image", [0, 2, 1, 3])({"image": img})["image"]
    assert out.flatten().tolist() == [0.0, 2.0, 1.0, 3.0] and out.meta["filename_or_obj"] == "x-t2f.nii.gz"
    with pytest.raises(InputDataError, match="x-t2f.nii.gz.*at least 6 channels"):
        SelectChannelsd("image", [5])({"image": img})


def test_mean_ensemble_members_and_average():
    from medseg_nets.nets.ensemble import MeanEnsemble

    net = torch.nn.Conv3d(1, 2, 1)
    single = MeanEnsemble.for_checkpoints(net, ["a.pt", None, ""])
    assert len(single.members) == 1 and single.members[0] is net and single.checkpoints == ["a.pt"]
    pair = MeanEnsemble.for_checkpoints(net, ["a.pt", "b.pt"])
    with torch.no_grad():
        pair.members[1].weight.add_(1.0)
    x = torch.randn(1, 1, 2, 2, 2)
    torch.testing.assert_close(pair(x), (pair.members[0](x) + pair.members[1](x)) / 2)
    with pytest.raises(ValueError, match="no checkpoint"):
        MeanEnsemble.for_checkpoints(net, [None])
