#!/usr/bin/env python
"""Generate a small synthetic MSD-Task01-like brain-tumour dataset (4D NIfTI + ``dataset.json``).

Each case is a brain-shaped ellipsoid with smooth tissue texture, a bias field and noise, in four MRI-like channels
(FLAIR, T1w, T1gd, T2w, in MSD order), and a tumour made of nested regions with MSD labels:
1 = edema (bright on FLAIR/T2w), 2 = non-enhancing/necrotic core (dark on T1w/T1gd), 3 = enhancing rim (bright on
T1gd). Tumour shape (randomly deformed ellipsoids), size, position and contrast vary per case, and some cases have a
second lesion, so that a network must learn the appearance, not a fixed location.

Usage:
    python tools/make_demo_data.py --out demo_data/Task01_BrainTumour --cases 12 --test 2 --size 64 64 48
    python tools/make_demo_data.py --brats 2021 --out demo_data/BraTS2021 --cases 8 --test 1 --size 96 96 96
    python tools/make_demo_data.py --ct --out demo_data/BTCV --cases 8 --test 1 --size 96 96 48
    python tools/make_demo_data.py --skin isic2018 --out demo_data/ISIC2018 --cases 20 --test 2   # or --skin ph2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
# mean intensity per tissue (rows: background, white/grey matter, CSF, edema, core, enhancing) per channel
TISSUE = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],
        [0.45, 0.60, 0.55, 0.40],
        [0.20, 0.25, 0.25, 0.85],
        [0.85, 0.45, 0.50, 0.80],
        [0.60, 0.25, 0.30, 0.95],
        [0.70, 0.50, 1.00, 0.70],
    ],
    dtype=np.float32,
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (np.abs(n).max() + 1e-8)


def _blob(rng: np.random.Generator, grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, wobble: np.ndarray) -> np.ndarray:
    """Signed 'inside' field of a randomly rotated, deformed ellipsoid (> 0 inside)."""
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    d = np.tensordot(q, grid - centre[:, None, None, None], axes=1) / radii[:, None, None, None]
    return 1.0 - np.sqrt((d**2).sum(0)) + 0.35 * wobble


def make_case(rng: np.random.Generator, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image (X, Y, Z, 4) float32 and label (X, Y, Z) uint8 with values 0..3."""
    shape = tuple(size)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-2, 2, 3)
    brain = _blob(rng, grid, centre, np.array(shape) * rng.uniform(0.40, 0.46, 3), 0.3 * _smooth_noise(rng, shape, 6)) > 0
    csf = brain & (_blob(rng, grid, centre, np.array(shape) * rng.uniform(0.08, 0.14, 3), _smooth_noise(rng, shape, 3)) > 0)
    tissue = np.where(brain, 1, 0)
    tissue[csf] = 2
    label = np.zeros(shape, np.uint8)
    for lesion in range(1 + int(rng.random() < 0.3)):
        inside = np.argwhere(brain & ~csf)
        c = inside[rng.integers(len(inside))].astype(np.float32)
        r = rng.uniform(0.14, 0.26) * min(shape) * rng.uniform(0.75, 1.25, 3)
        field = _blob(rng, grid, c, r, _smooth_noise(rng, shape, 2.5))
        scale = rng.uniform(0.5, 0.75)  # core radius relative to edema
        edema, tumour = field > 0, field > 1 - scale
        core = field > 1 - scale * rng.uniform(0.55, 0.85)
        label[edema & brain] = 1
        label[tumour & brain] = 3  # enhancing rim ...
        label[core & brain] = 2  # ... around a non-enhancing/necrotic core
    tissue[label == 1] = 3
    tissue[label == 2] = 4
    tissue[label == 3] = 5
    contrast = rng.uniform(0.85, 1.15, (6, 4)).astype(np.float32)
    contrast[0] = 0
    image = (TISSUE * contrast)[tissue]  # (X, Y, Z, 4)
    texture = _smooth_noise(rng, shape + (4,), 1.5)
    bias = 1 + 0.2 * _smooth_noise(rng, shape, 12)[..., None]
    image = (image * (1 + 0.15 * texture)) * bias + 0.03 * rng.standard_normal(shape + (4,)).astype(np.float32)
    image[~brain] = 0.0
    image *= rng.uniform(300, 1200, 4).astype(np.float32)  # arbitrary scanner units per channel
    return image.astype(np.float32), label


def make_dataset(out: str | Path, cases: int = 12, test: int = 2, size=(64, 64, 48), seed: int = 0,
                 spacing=(1.0, 1.0, 1.0), test_labels: bool = False) -> Path:
    """Write ``cases`` labelled cases to imagesTr/labelsTr, ``test`` unlabelled ones to imagesTs, and dataset.json.

    With ``test_labels`` the test cases' ground truth goes to ``labelsTs`` (not listed in dataset.json, as in MSD,
    where test labels are withheld), so that predictions can be scored in the input's space."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(spacing) + [1.0])
    training, testing = [], []
    for i in range(cases + test):
        name = f"BRATS_{i + 1:03d}.nii.gz"
        image, label = make_case(rng, tuple(size))
        if i < cases:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTs" / name)
            testing.append(f"./imagesTs/{name}")
            if test_labels:
                (out / "labelsTs").mkdir(exist_ok=True)
                nib.save(nib.Nifti1Image(label, affine), out / "labelsTs" / name)
    meta = {
        "name": "BRATS-synthetic",
        "description": "Synthetic MSD Task01-like brain tumour data generated by medseg-bundles tools/make_demo_data.py",
        "reference": "generated",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "4D",
        "modality": MODALITIES,
        "labels": LABELS,
        "numTraining": len(training),
        "numTest": len(testing),
        "training": training,
        "test": testing,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# --- synthetic dermoscopy (ISIC 2018 task 1 / PH2 layouts) -------------------------------------------------------
SKIN_LAYOUTS = ("isic2018", "ph2")


def make_skin_case(rng: np.random.Generator, size: tuple[int, int], hairs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like image (H, W, 3) uint8 and its lesion mask (H, W) uint8 0/255.

    Skin-tone background with mottling, fine texture and sometimes a dark circular vignette; one irregular lesion
    (a rotated, anisotropic star-shaped outline with random harmonics), darker and brown with internal structure,
    blended into the skin over a fuzzy border (the mask is the middle of the border); optional dark hairs drawn
    across image and lesion (not in the mask); sensor noise.
    """
    from PIL import Image, ImageDraw

    h, w = int(size[0]), int(size[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tone = np.array([rng.uniform(195, 235), rng.uniform(145, 185), rng.uniform(115, 160)], np.float32)
    mottle = _smooth_noise(rng, (h, w), max(h, w) / 12)
    fine = _smooth_noise(rng, (h, w), 0.8)
    redness = np.clip(_smooth_noise(rng, (h, w), max(h, w) / 8), 0, None)
    skin = tone * (1 + 0.07 * mottle[..., None] + 0.04 * fine[..., None])
    skin[..., 0] += 18 * redness
    # lesion outline: r(phi) = r0 * (1 + sum_k a_k cos(k phi + p_k)) in a rotated, stretched frame
    cy, cx = h / 2 + rng.uniform(-0.12, 0.12) * h, w / 2 + rng.uniform(-0.12, 0.12) * w
    rot, stretch = rng.uniform(0, np.pi), rng.uniform(0.7, 1.0)
    u = np.cos(rot) * (xx - cx) + np.sin(rot) * (yy - cy)
    v = (-np.sin(rot) * (xx - cx) + np.cos(rot) * (yy - cy)) / stretch
    dist, phi = np.hypot(u, v), np.arctan2(v, u)
    r0 = rng.uniform(0.16, 0.30) * min(h, w)
    radius = np.full_like(dist, r0)
    for k in range(2, 8):
        radius += r0 * rng.uniform(0, 0.18 / k * 2) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    border = rng.uniform(0.015, 0.05) * min(h, w)  # width of the fuzzy border in pixels
    alpha = 1.0 / (1.0 + np.exp(-(radius - dist) / max(border / 4, 0.3)))
    mask = dist < radius
    brown = np.array([rng.uniform(85, 150), rng.uniform(45, 95), rng.uniform(30, 75)], np.float32)
    structure = _smooth_noise(rng, (h, w), max(r0 / 6, 1.0))
    lesion = brown * (1 + 0.25 * structure[..., None])
    if rng.random() < 0.4:  # blue-grey veil in part of the lesion
        veil = np.clip(_smooth_noise(rng, (h, w), max(r0 / 3, 1.0)), 0, None)[..., None]
        lesion = lesion * (1 - 0.5 * veil) + np.array([90, 95, 120], np.float32) * 0.5 * veil
    img = skin * (1 - alpha[..., None]) + lesion * alpha[..., None]
    if rng.random() < 0.5:  # dark corners of a circular dermoscope field
        rr = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
        img *= np.clip(1 - (rr - rng.uniform(0.95, 1.15)) / 0.3, 0.15, 1)[..., None]
    if hairs:
        layer = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(0, 7))):
            p0, p1, p2 = (rng.uniform([0, 0], [w, h]) for _ in range(3))
            t = np.linspace(0, 1, 40)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
            draw.line([tuple(p) for p in pts], fill=255, width=int(rng.integers(1, 3)))
        hair = ndimage.gaussian_filter(np.asarray(layer, np.float32) / 255, 0.5)[..., None]
        img = img * (1 - 0.85 * hair) + np.array([45, 32, 25], np.float32) * 0.85 * hair
    img = img + rng.normal(0, 3, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), np.where(mask, 255, 0).astype(np.uint8)


def make_skin_dataset(out: str | Path, cases: int = 8, size=(96, 128), seed: int = 0, layout: str = "isic2018",
                      test: int = 0, hairs: bool = True, vary_size: bool = True) -> Path:
    """Write ``cases`` labelled synthetic dermoscopy cases (and ``test`` unlabelled images) in the layout of ISIC 2018
    task 1 (``layout="isic2018"``: ``ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` + ``..._superpixels.png``,
    ``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png``, test images in
    ``ISIC2018_Task1-2_Test_Input/``) or PH2 (``layout="ph2"``: ``PH2 Dataset images/IMD<nnn>/IMD<nnn>_Dermoscopic_Image/
    IMD<nnn>.bmp`` + ``IMD<nnn>_lesion/IMD<nnn>_lesion.bmp``; test cases have no ``_lesion`` folder).
    ``size`` is (height, width); with ``vary_size`` each case is scaled by a random factor in [0.85, 1.15] per axis,
    as real images differ in size. Masks are 8-bit grey, 0 = background, 255 = lesion. Returns ``out``."""
    from PIL import Image

    if layout not in SKIN_LAYOUTS:
        raise ValueError(f"layout must be one of {SKIN_LAYOUTS}, got {layout!r}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(cases + test):
        hw = np.asarray(size, np.float64) * (rng.uniform(0.85, 1.15, 2) if vary_size else 1.0)
        image, mask = make_skin_case(rng, tuple(int(round(s)) for s in hw), hairs=hairs)
        labelled = i < cases
        if layout == "isic2018":
            name = f"ISIC_{i:07d}"
            folder = out / ("ISIC2018_Task1-2_Training_Input" if labelled else "ISIC2018_Task1-2_Test_Input")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{name}.jpg", quality=92)
            superpixels = np.zeros(image.shape, np.uint8)  # the challenge's superpixel maps, ignored by readers
            superpixels[..., 0] = (np.arange(image.shape[1]) // 8)[None, :] % 256
            Image.fromarray(superpixels).save(folder / f"{name}_superpixels.png")
            if labelled:
                gt = out / "ISIC2018_Task1_Training_GroundTruth"
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(gt / f"{name}_segmentation.png")
        else:
            name = f"IMD{i + 2:03d}"
            case = out / "PH2 Dataset images" / name
            (case / f"{name}_Dermoscopic_Image").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(case / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
            if labelled:
                (case / f"{name}_lesion").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(case / f"{name}_lesion" / f"{name}_lesion.bmp")
    (out / "ATTRIBUTION.txt").write_text("Synthetic dermoscopy-like data generated by medseg-bundles "
                                         "tools/make_demo_data.py (CC0); not real patient data.\n")
    return out


# --- BraTS challenge folders and BTCV-like CT (GLIMS bundle) ---------------------------------------------------------

BRATS_NAMING = {  # convention -> (case id pattern, modality/seg suffixes in the order flair, t1, t1ce, t2, seg)
    "2020": ("BraTS20_Training_{:03d}", ("_flair", "_t1", "_t1ce", "_t2", "_seg")),
    "2021": ("BraTS2021_{:05d}", ("_flair", "_t1", "_t1ce", "_t2", "_seg")),
    "2023": ("BraTS-GLI-{:05d}-000", ("-t2f", "-t1n", "-t1c", "-t2w", "-seg")),
}


def make_brats_dataset(out: str | Path, cases: int = 4, size=(64, 64, 48), seed: int = 0, convention: str = "2021",
                       test: int = 0, first_index: int = 0) -> Path:
    """Write BraTS challenge case folders: ``cases`` labelled ones and ``test`` without segmentation.

    ``convention`` "2020"/"2021": ``BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz`` (2020:
    ``BraTS20_Training_001/...``), labels 0 background, 1 necrotic/non-enhancing core, 2 edema, 4 enhancing;
    "2023": ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz``, labels 0/1/2/3 (3 enhancing).
    Anatomy and tumours come from :func:`make_case`; modalities are int16 as in the challenge data, with the
    challenge's LPS-flipped affine. Returns ``out``."""
    if convention not in BRATS_NAMING:
        raise ValueError(f"convention must be one of {sorted(BRATS_NAMING)}, got {convention!r}")
    pattern, suffixes = BRATS_NAMING[convention]
    et = 3 if convention == "2023" else 4
    out = Path(out)
    rng = np.random.default_rng(seed)
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, size[1] - 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    for i in range(cases + test):
        n = first_index + i + (1 if convention == "2020" else 0)
        case = pattern.format(n)
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        image, msd_label = make_case(rng, tuple(size))
        for c, suffix in enumerate(suffixes[:4]):
            nib.save(nib.Nifti1Image(np.round(image[..., c]).astype(np.int16), affine), folder / f"{case}{suffix}.nii.gz")
        if i < cases:  # MSD 1 edema, 2 non-enhancing core, 3 enhancing -> BraTS 2 edema, 1 core, 4 (or 3) enhancing
            label = np.choose(msd_label, np.array([0, 2, 1, et], np.uint8)).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, affine), folder / f"{case}{suffixes[4]}.nii.gz")
    return out


BTCV_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gallbladder", "5": "esophagus",
    "6": "liver", "7": "stomach", "8": "aorta", "9": "inferior vena cava", "10": "portal vein and splenic vein",
    "11": "pancreas", "12": "right adrenal gland", "13": "left adrenal gland",
}


def make_ct_case(rng: np.random.Generator, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT: image (X, Y, Z) in Hounsfield units (int16) and label (X, Y, Z) uint8 with a few
    BTCV organs (1 spleen, 2 right kidney, 3 left kidney, 6 liver, 7 stomach, 8 aorta) in a body of fat and muscle
    with a vertebra; organ sizes, positions and densities vary per case."""
    shape = tuple(size)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    x, y = grid[0] / shape[0] - 0.5, grid[1] / shape[1] - 0.5  # -0.5 .. 0.5 in plane
    a, b = rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36)
    body = (x / a) ** 2 + (y / b) ** 2 < 1
    muscle = (x / (a - 0.05)) ** 2 + (y / (b - 0.05)) ** 2 < 1
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = rng.uniform(-110, -90)  # subcutaneous fat
    hu[muscle] = rng.uniform(35, 50)
    vertebra = ((x / 0.07) ** 2 + ((y - 0.2) / 0.07) ** 2) < 1
    hu[vertebra] = rng.uniform(500, 800)
    label = np.zeros(shape, np.uint8)
    organs = [  # label, centre (x, y) in plane, radii (fraction of the size), HU
        (6, (-0.17, -0.02), (0.16, 0.14, 0.45), (55, 70)),
        (1, (0.21, 0.07), (0.07, 0.06, 0.25), (45, 55)),
        (2, (-0.12, 0.17), (0.06, 0.05, 0.22), (150, 190)),
        (3, (0.12, 0.17), (0.06, 0.05, 0.22), (150, 190)),
        (7, (0.10, -0.10), (0.10, 0.07, 0.25), (5, 25)),
    ]
    for lab, (cx, cy), radii, (lo, hi) in organs:
        centre = np.array([(0.5 + cx + rng.uniform(-0.02, 0.02)) * shape[0], (0.5 + cy + rng.uniform(-0.02, 0.02))
                           * shape[1], shape[2] * rng.uniform(0.4, 0.6)], np.float32)
        r = np.array(radii) * np.array(shape) * rng.uniform(0.85, 1.15, 3)
        inside = (_blob(rng, grid, centre, r, 0.5 * _smooth_noise(rng, shape, 3)) > 0) & muscle & ~vertebra
        label[inside & (label == 0)] = lab
        hu[inside] = rng.uniform(lo, hi)
    aorta = (((x - rng.uniform(-0.03, 0.03)) / 0.035) ** 2 + ((y - 0.08) / 0.035) ** 2) < 1
    label[aorta & muscle] = 8
    hu[aorta & muscle] = rng.uniform(180, 280)
    hu += 15 * rng.standard_normal(shape).astype(np.float32) * (hu > -900)
    return np.round(hu).astype(np.int16), label


def make_ct_dataset(out: str | Path, cases: int = 4, test: int = 1, size=(64, 64, 32), seed: int = 0,
                    spacing=(0.8, 0.8, 2.5)) -> Path:
    """Write a BTCV-like abdominal CT set in the MSD layout: ``imagesTr/img0001.nii.gz``,
    ``labelsTr/label0001.nii.gz`` (labels 0..13, BTCV numbering, a few organs present), ``imagesTs/`` and an
    MSD-style ``dataset.json``. Returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = [-0.5 * s * n for s, n in zip(spacing, size)]
    training, testing = [], []
    for i in range(cases + test):
        image, label = make_ct_case(rng, tuple(size))
        if i < cases:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / f"img{i + 1:04d}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / f"label{i + 1:04d}.nii.gz")
            training.append({"image": f"./imagesTr/img{i + 1:04d}.nii.gz", "label": f"./labelsTr/label{i + 1:04d}.nii.gz"})
        else:
            nib.save(nib.Nifti1Image(image, affine), out / "imagesTs" / f"img{i + 1:04d}.nii.gz")
            testing.append(f"./imagesTs/img{i + 1:04d}.nii.gz")
    meta = {
        "name": "BTCV-synthetic",
        "description": "Synthetic BTCV-like abdominal CT generated by medseg-bundles tools/make_demo_data.py",
        "reference": "generated", "licence": "CC0 (synthetic)", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": BTCV_LABELS,
        "numTraining": len(training), "numTest": len(testing), "training": training, "test": testing,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_data/Task01_BrainTumour")
    p.add_argument("--cases", type=int, default=12, help="labelled cases (imagesTr/labelsTr)")
    p.add_argument("--test", type=int, default=2, help="unlabelled cases (imagesTs)")
    p.add_argument("--size", type=int, nargs=3, default=[64, 64, 48])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skin", choices=SKIN_LAYOUTS, help="write synthetic dermoscopy in this layout instead (EAM-Net)")
    p.add_argument("--skin-size", type=int, nargs=2, default=[192, 256], help="dermoscopy height width")
    p.add_argument("--brats", choices=sorted(BRATS_NAMING), help="write BraTS case folders in this naming instead (GLIMS)")
    p.add_argument("--ct", action="store_true", help="write BTCV-like CT (imagesTr/labelsTr, dataset.json) instead")
    a = p.parse_args()
    if a.brats:
        out = make_brats_dataset(a.out, a.cases, tuple(a.size), a.seed, a.brats, a.test)
        print(f"wrote {a.cases} labelled + {a.test} unlabelled BraTS {a.brats} cases to {out}")
        return
    if a.ct:
        out = make_ct_dataset(a.out, a.cases, a.test, tuple(a.size), a.seed)
        print(f"wrote {a.cases} training + {a.test} test CT cases to {out}")
        return
    if a.skin:
        out = make_skin_dataset(a.out, a.cases, tuple(a.skin_size), a.seed, a.skin, a.test)
        print(f"wrote {a.cases} labelled + {a.test} unlabelled {a.skin} images to {out}")
        return
    out = make_dataset(a.out, a.cases, a.test, tuple(a.size), a.seed, tuple(a.spacing))
    print(f"wrote {a.cases} training + {a.test} test cases to {out}")


if __name__ == "__main__":
    main()
