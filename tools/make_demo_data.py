#!/usr/bin/env python
"""Generate a small synthetic MSD-Task01-like brain-tumour dataset (4D NIfTI + ``dataset.json``).

Each case is a brain-shaped ellipsoid with smooth tissue texture, a bias field and noise, in four MRI-like channels
(FLAIR, T1w, T1gd, T2w, in MSD order), and a tumour made of nested regions with MSD labels:
1 = edema (bright on FLAIR/T2w), 2 = non-enhancing/necrotic core (dark on T1w/T1gd), 3 = enhancing rim (bright on
T1gd). Tumour shape (randomly deformed ellipsoids), size, position and contrast vary per case, and some cases have a
second lesion, so that a network must learn the appearance, not a fixed location.

Usage:
    python tools/make_demo_data.py --out demo_data/Task01_BrainTumour --cases 12 --test 2 --size 64 64 48
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
                 spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write ``cases`` labelled cases to imagesTr/labelsTr, ``test`` unlabelled ones to imagesTs, and dataset.json."""
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_data/Task01_BrainTumour")
    p.add_argument("--cases", type=int, default=12, help="labelled cases (imagesTr/labelsTr)")
    p.add_argument("--test", type=int, default=2, help="unlabelled cases (imagesTs)")
    p.add_argument("--size", type=int, nargs=3, default=[64, 64, 48])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = make_dataset(a.out, a.cases, a.test, tuple(a.size), a.seed, tuple(a.spacing))
    print(f"wrote {a.cases} training + {a.test} test cases to {out}")


if __name__ == "__main__":
    main()
