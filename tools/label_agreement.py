#!/usr/bin/env python
"""Agreement between two folders of BraTS label maps (e.g. one model under two inference settings): Dice per region.

For every ``*_seg.nii.gz`` (or other NIfTI) file present in both folders under the same name, the label maps are
turned into the BraTS regions TC, WT and ET (``medseg_nets.transforms.brats_label_to_regions``; the convention is
detected from the values, 2021 by default) and compared voxel by voxel:

* per case and region: ``Dice = 2 |A and B| / (|A| + |B|)`` (1 when both are empty);
* per region over all cases ("pooled"): the same with the voxel counts summed over the cases;
* the lowest per-case Dice of each region.

Usage:
    python tools/label_agreement.py PRED_DIR_A PRED_DIR_B [--labels brats|msd] [--json out.json]

The exit status is non-zero when the folders share no file or two maps differ in shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medseg_nets, when run from a checkout

from medseg_nets.transforms.brats import BRATS_REGION_NAMES, brats_label_to_regions, detect_brats_convention  # noqa: E402


#: MSD Task01 labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour) of each region, in BRATS_REGION_NAMES order
MSD_REGIONS = {"TC": (2, 3), "WT": (1, 2, 3), "ET": (3,)}


def _regions(path: Path, labels: str = "brats") -> np.ndarray:
    values = np.asarray(nib.load(str(path)).dataobj).astype(np.int64)
    if labels == "msd":  # (3, X, Y, Z): TC, WT, ET
        return np.stack([np.isin(values, MSD_REGIONS[r]) for r in BRATS_REGION_NAMES])
    label = torch.as_tensor(values)[None]
    convention = detect_brats_convention(label, name=str(path))
    return brats_label_to_regions(label, convention).numpy().astype(bool)  # (3, X, Y, Z): TC, WT, ET


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def agreement(dir_a: Path, dir_b: Path, labels: str = "brats") -> dict:
    """Per-case, pooled and lowest Dice per region between the label maps of the same name in both folders;
    ``labels``: ``"brats"`` (BraTS 2021 or 2023 values, detected) or ``"msd"`` (MSD Task01: 1 edema, 2 non-enhancing,
    3 enhancing; the dalight3d bundle's output)."""
    names = sorted(p.name for p in Path(dir_a).glob("*.nii*") if (Path(dir_b) / p.name).is_file())
    if not names:
        raise ValueError(f"{dir_a} and {dir_b} have no NIfTI file name in common")
    cases, inter, sizes = {}, np.zeros(3), np.zeros(3)
    for name in names:
        a, b = _regions(Path(dir_a) / name, labels), _regions(Path(dir_b) / name, labels)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {a.shape[1:]} vs {b.shape[1:]}")
        cases[name] = {r: dice(a[i], b[i]) for i, r in enumerate(BRATS_REGION_NAMES)}
        inter += [np.logical_and(a[i], b[i]).sum() for i in range(3)]
        sizes += [a[i].sum() + b[i].sum() for i in range(3)]
    pooled = {r: (1.0 if sizes[i] == 0 else float(2 * inter[i] / sizes[i])) for i, r in enumerate(BRATS_REGION_NAMES)}
    lowest = {r: min(c[r] for c in cases.values()) for r in BRATS_REGION_NAMES}
    return {"cases": cases, "pooled": pooled, "lowest": lowest, "n_cases": len(cases)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir_a", type=Path)
    p.add_argument("dir_b", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--labels", choices=("brats", "msd"), default="brats",
                   help="label values: BraTS (2021 or 2023, detected; default) or MSD Task01 (1 edema, 2 non-enhancing, "
                        "3 enhancing: dalight3d)")
    a = p.parse_args(argv)
    try:
        result = agreement(a.dir_a, a.dir_b, a.labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("case " + " ".join(f"{r:>7s}" for r in BRATS_REGION_NAMES))
    for name, d in result["cases"].items():
        print(f"{name} " + " ".join(f"{d[r]:7.4f}" for r in BRATS_REGION_NAMES))
    for key in ("pooled", "lowest"):
        print(f"{key} " + " ".join(f"{result[key][r]:7.4f}" for r in BRATS_REGION_NAMES))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
