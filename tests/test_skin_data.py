"""ISIC 2018 / PH2 readers, the EAM-Net bundle's load and save pipelines, colour jitter, per-case confusion metrics."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from PIL import Image

from conftest import ROOT
from make_demo_data import make_skin_case, make_skin_dataset
from medseg_nets import InputDataError
from medseg_nets.data import PNGMaskWriter, detect_skin_format, skin_datalists
from medseg_nets.handlers import ConfusionMatrixPerCase
from medseg_nets.transforms import RandColorJitterd, color_jitter

CFG = ROOT / "bundles" / "eamnet" / "configs"


@pytest.fixture(scope="module")
def isic_dir(tmp_path_factory) -> Path:
    return make_skin_dataset(tmp_path_factory.mktemp("isic"), cases=10, size=(40, 52), seed=1, test=2)


@pytest.fixture(scope="module")
def ph2_dir(tmp_path_factory) -> Path:
    return make_skin_dataset(tmp_path_factory.mktemp("ph2"), cases=3, size=(40, 52), seed=2, layout="ph2", test=1)


def _parser(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CFG / f) for f in files])
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- finding the files -------------------------------------------------------------------------------------------


def test_isic2018_layout_found_by_id_anywhere(isic_dir, tmp_path):
    root = _copy(isic_dir, tmp_path / "isic")
    (root / "ISIC2018_Task1-2_Training_Input" / "._ISIC_0000000.jpg").write_bytes(b"macOS resource fork")
    (root / "extra" / "nested").mkdir(parents=True)
    shutil.move(root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000003.jpg", root / "extra" / "nested")
    orphan = root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0099999_segmentation.png"
    shutil.copy(root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png", orphan)

    lists = skin_datalists(str(root), output_dir=str(tmp_path / "out"), val_fraction=0.2, seed=0)
    assert detect_skin_format(root) == "isic2018"
    assert len(lists["labelled"]) == 10 and len(lists["test"]) == 12  # 2 test inputs have no mask
    assert len(lists["training"]) == 8 and len(lists["validation"]) == 2
    for item in lists["labelled"]:
        assert Path(item["label"]).name == Path(item["image"]).stem + "_segmentation.png"
        assert Path(item["image"]).is_absolute()
    assert not any("superpixels" in x["image"] or "._" in x["image"] for x in lists["test"])
    assert any("nested" in x["image"] for x in lists["labelled"])
    split = json.loads((tmp_path / "out" / "datalist_split.json").read_text())
    assert split["dataset_format"] == "isic2018" and split["seed"] == 0
    assert split["training"] == lists["training"] and split["validation"] == lists["validation"]


def test_ph2_layout(ph2_dir):
    lists = skin_datalists(str(ph2_dir), dataset="ph2", val_fraction=0.34)
    assert [Path(x["image"]).name for x in lists["labelled"]] == ["IMD002.bmp", "IMD003.bmp", "IMD004.bmp"]
    assert all(Path(x["label"]).name == Path(x["image"]).stem + "_lesion.bmp" for x in lists["labelled"])
    assert len(lists["test"]) == 4 and len(lists["validation"]) == 1
    assert detect_skin_format(ph2_dir) == "ph2"


def test_split_is_seeded(isic_dir):
    a = skin_datalists(str(isic_dir), seed=3, check_headers=False)
    b = skin_datalists(str(isic_dir), seed=3, check_headers=False)
    c = skin_datalists(str(isic_dir), seed=4, check_headers=False)
    assert a == b
    assert a["validation"] != c["validation"]
    assert sorted(x["image"] for x in a["training"] + a["validation"]) == [x["image"] for x in a["labelled"]]


def test_layout_detection_errors_and_override(isic_dir, ph2_dir, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(isic_dir, both / "isic")
    shutil.copytree(ph2_dir, both / "ph2")
    with pytest.raises(InputDataError, match="both ISIC 2018 and PH2.*dataset_format"):
        skin_datalists(str(both))
    assert len(skin_datalists(str(both), dataset="ph2")["labelled"]) == 3
    assert len(skin_datalists(str(both), dataset="ISIC2018")["labelled"]) == 10
    with pytest.raises(ValueError, match="dataset_format must be"):
        skin_datalists(str(both), dataset="ham10000")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputDataError, match=r"(?s)no skin-lesion images found.*ISIC_<id>.jpg.*IMD<nnn>"):
        skin_datalists(str(tmp_path / "other"))
    with pytest.raises(InputDataError, match="dataset_dir is missing or empty"):
        skin_datalists(str(tmp_path / "missing"))


def test_duplicate_case_is_an_error(isic_dir, tmp_path):
    root = _copy(isic_dir, tmp_path / "isic")
    (root / "copy").mkdir()
    shutil.copy(root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg", root / "copy")
    with pytest.raises(InputDataError, match="ISIC_0000001.*is also at"):
        skin_datalists(str(root))


def test_header_checks_name_the_file(isic_dir, tmp_path):
    root = _copy(isic_dir, tmp_path / "isic")
    mask = root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000002_segmentation.png"
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    with pytest.raises(InputDataError, match=rf"{mask}: mask size 9x7 .* does not match image .*ISIC_0000002.jpg"):
        skin_datalists(str(root))
    shutil.copy(isic_dir / mask.relative_to(root), mask)
    image = root / "ISIC2018_Task1-2_Test_Input" / "ISIC_0000011.jpg"
    image.write_bytes(b"not a jpeg")
    with pytest.raises(InputDataError, match=rf"{image}: cannot be read"):
        skin_datalists(str(root))


# --- the bundle's load pipeline (train.json load_transforms) -----------------------------------------------------


def _input_error(fn, pattern: str) -> InputDataError:
    """Run ``fn`` and return the InputDataError it raised (MONAI's Compose wraps it in a RuntimeError)."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not isinstance(err, InputDataError):
        err = err.__cause__
    assert err is not None, f"no InputDataError in {info.value!r}"
    assert re.search(pattern, str(err)), f"{pattern!r} not in {err}"
    return err


def _load(item: dict, size=(32, 32)) -> dict:
    parser = _parser("train.json", image_size=list(size))
    from monai.transforms import Compose

    return Compose(parser.get_parsed_content("load_transforms"))(item)


def _case(tmp_path: Path, mask_mode: str = "L", size=(30, 44), seed=0) -> dict:
    image, mask = make_skin_case(np.random.default_rng(seed), size, hairs=False)
    Image.fromarray(image).save(tmp_path / "img.jpg", quality=95)
    m = Image.fromarray(mask)
    if mask_mode == "1":
        m = m.convert("1")
    elif mask_mode == "RGB":
        m = m.convert("RGB")
    m.save(tmp_path / ("mask.bmp" if mask_mode == "1" else "mask.png"))
    return {"image": str(tmp_path / "img.jpg"), "label": str(tmp_path / ("mask.bmp" if mask_mode == "1" else "mask.png"))}


@pytest.mark.parametrize("mode", ["L", "1", "RGB"])
def test_load_pipeline_accepts_mask_encodings(tmp_path, mode):
    d = _load(_case(tmp_path, mode))
    assert d["image"].shape == (3, 32, 32) and d["label"].shape == (1, 32, 32)
    assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
    assert set(torch.unique(d["label"]).tolist()) == {0.0, 1.0}


def test_load_pipeline_bad_inputs_name_the_file(tmp_path):
    item = _case(tmp_path)
    grey = np.asarray(Image.open(item["label"])).copy()
    grey[grey > 0] = 200
    Image.fromarray(grey).save(item["label"])
    label, image = re.escape(item["label"]), re.escape(item["image"])
    _input_error(lambda: _load(item), rf"{label}: label values \[200(\.0)?\] are not among the expected \[0, 255\]")
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(item["label"])
    _input_error(lambda: _load(item), rf"{label}: label shape .* does not match image")
    colour = np.zeros((30, 44, 3), np.uint8)
    colour[5:10, 5:10] = (255, 0, 0)
    Image.fromarray(colour).save(item["label"])
    _input_error(lambda: _load(item), rf"{label}: label shape \(3, ")
    data = Path(item["image"]).read_bytes()
    Path(item["image"]).write_bytes(data[: len(data) // 2])  # header fine, data truncated
    _input_error(lambda: _load(item), rf"(?s){image}: cannot be read .*RGB dermoscopy image")
    Image.open(_case(tmp_path / "..")["image"]).convert("L").save(item["image"])
    _input_error(lambda: _load(item), rf"{image}: has 1 channel\(s\).*expected 3 \(R, G, B\)")


# --- inference post-processing and the PNG writer ----------------------------------------------------------------


def test_inference_roundtrip_writes_mask_aligned_at_original_size(tmp_path):
    """The ground-truth mask as 'prediction' through the bundle's own pre/post-processing comes back in place."""
    item = _case(tmp_path, size=(46, 70), seed=5)  # not square: a transposed mask would have the wrong size
    truth = np.asarray(Image.open(item["label"])) > 0
    parser = _parser("inference.json", output_dir=str(tmp_path / "out"), image_size=[32, 32], save_overlay=True)
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    d = pre({"image": item["image"]})
    label = _load(item, size=(32, 32))["label"]
    d["pred"] = (label * 8 - 4).as_tensor()  # logits of the true mask, resized as the network sees it
    d["pred"] = d["image"].__class__(d["pred"], meta=dict(d["image"].meta), applied_operations=list(d["image"].applied_operations))
    post(d)
    out = tmp_path / "out" / "img_seg.png"
    mask = Image.open(out)
    assert mask.mode == "L" and mask.size == (70, 46)
    pred = np.asarray(mask)
    assert set(np.unique(pred)) <= {0, 255}
    pred = pred > 0
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.9, dice
    overlay = np.asarray(Image.open(tmp_path / "out" / "img_overlay.png"))
    assert overlay.shape == (46, 70, 3)
    assert (overlay[pred] != np.asarray(Image.open(item["image"]))[pred]).any()
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_png_writer_checks_size_and_writes_atomically(tmp_path):
    src = tmp_path / "src.png"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(src)
    writer = PNGMaskWriter(save_overlay="false")
    writer.set_data_array(torch.ones(1, 8, 6))  # MONAI's PIL convention: (channel, width, height)
    writer.set_metadata({"filename_or_obj": str(src)})
    writer.write(tmp_path / "src_seg.png")
    assert np.asarray(Image.open(tmp_path / "src_seg.png")).shape == (6, 8)
    assert not (tmp_path / "src_overlay.png").exists()
    writer.set_data_array(torch.ones(1, 6, 8))
    with pytest.raises(ValueError, match="does not have the size of its source image"):
        writer.write(tmp_path / "wrong_seg.png")
    assert not (tmp_path / "wrong_seg.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.png", "src_seg.png"]


# --- colour jitter and metrics -----------------------------------------------------------------------------------


def test_color_jitter():
    torch.manual_seed(0)
    x = torch.rand(3, 8, 9)
    torch.testing.assert_close(color_jitter(x), x)
    g = color_jitter(x, saturation=0.0)
    torch.testing.assert_close(g[0], g[1])
    torch.testing.assert_close(g[1], g[2])
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    mid = 0.25 + 0.5 * x  # away from the clip
    h = color_jitter(mid, hue=0.1)
    torch.testing.assert_close((h * luma).sum(0), (mid * luma).sum(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h, mid)
    torch.testing.assert_close(color_jitter(mid, hue=0.5 - 1e-9), color_jitter(mid, hue=-0.5 + 1e-9), atol=1e-5, rtol=1e-5)
    y = color_jitter(x, brightness=1.5, contrast=1.3)
    assert y.min() >= 0 and y.max() <= 1

    t = RandColorJitterd("image", prob=1.0)
    a = t.set_random_state(7)({"image": x})["image"]
    b = RandColorJitterd("image", prob=1.0).set_random_state(7)({"image": x})["image"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
    torch.testing.assert_close(RandColorJitterd("image", prob=0.0)({"image": x})["image"], x)


def test_confusion_matrix_per_case_details():
    pred = torch.zeros(3, 1, 4, 4)
    label = torch.zeros(3, 1, 4, 4)
    label[:, :, :2] = 1  # 8 lesion pixels each
    pred[0, :, :2] = 1  # perfect
    pred[1, :, :1] = 1  # half the lesion
    pred[2, :, :, :] = 1  # everything
    batches = [(pred[i : i + 1], label[i : i + 1]) for i in range(3)]
    engine = Engine(lambda e, b: b)
    handlers = {name: ConfusionMatrixPerCase(metric_name=name) for name in ("precision", "sensitivity", "f1 score")}
    pooled = ConfusionMatrixPerCase(metric_name="sensitivity", compute_sample=False)
    for name, h in handlers.items():
        h.attach(engine, name)
    pooled.attach(engine, "pooled")
    engine.run(batches)
    details = engine.state.metric_details
    torch.testing.assert_close(details["precision"].flatten(), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(details["sensitivity"].flatten(), torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(details["f1 score"].flatten(), torch.tensor([1.0, 2 / 3, 2 / 3]))
    assert engine.state.metrics["sensitivity"] == pytest.approx(2.5 / 3)
    assert engine.state.metrics["pooled"] == pytest.approx(20 / 24)
    assert details["pooled"].shape == (3, 1)


def test_demo_dermoscopy_looks_like_dermoscopy():
    rng = np.random.default_rng(0)
    for _ in range(3):
        image, mask = make_skin_case(rng, (64, 80))
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        lesion, skin = image[mask > 0].mean(0), image[mask == 0].mean(0)
        assert lesion.sum() < skin.sum() - 60  # darker lesion
        assert skin[0] > skin[2]  # skin tone: more red than blue
        assert 0.03 < (mask > 0).mean() < 0.5
