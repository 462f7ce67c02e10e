#!/usr/bin/env python
"""Turn BraTS case folders into a MONAI Label studies folder: one 4-channel NIfTI per case (+ its label).

MONAI Label's local datastore lists the image files at the top of the studies folder (no sub-folders) and sends one
file per request, so a BraTS case (four modality files in a folder) is invisible to it. This command writes, for
every case folder found under ``SRC`` (BraTS 2018-2021 ``<case>_flair/_t1/_t1ce/_t2[_seg].nii[.gz]`` or BraTS 2023+
``<case>-t2f/-t1n/-t1c/-t2w[-seg]``):

- ``DST/<case>.nii.gz``: the four modalities stacked on a fourth axis in the bundles' channel order (FLAIR, T1,
  T1ce, T2; ``medseg_nets.data.brats.MODALITIES``), each voxel value as stored in the case's files (same dtype
  when the four files share one), with the FLAIR file's affine and header (sform/qform codes, units);
- ``DST/labels/final/<case>.nii.gz``: the case's segmentation file, copied byte for byte (gzipped if it was
  ``.nii``), when the case has one: MONAI Label's "final" labels, which its training uses.

Nothing is resampled or reoriented: the four files of a case must have the same shape and affine (else the case
fails with a message naming the files). glims, emcad and dalight3d read these files (MSD Task01's channel order,
FLAIR, T1w, T1gd, T2w, is the same).

Usage:
    python tools/brats_to_studies.py /data/BraTS2021_TrainingData /data/monailabel_studies [--overwrite]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg_nets.data.brats import MODALITIES, NAMINGS


def _find(folder: Path, case: str, suffix: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{case}{suffix}{ext}"
        if p.is_file():
            return p
    return None


def find_cases(src: Path) -> list[tuple[str, dict[str, Path], Path | None]]:
    """``(case, {modality: file}, seg file or None)`` for every BraTS case folder under ``src``, sorted by case."""
    cases = []
    for folder in sorted({p.parent for p in src.rglob("*.nii*")}):
        case = folder.name
        for naming in NAMINGS.values():
            files = {m: _find(folder, case, naming[m]) for m in MODALITIES}
            if all(files.values()):
                cases.append((case, files, _find(folder, case, naming["seg"])))
                break
    return cases


def convert_case(case: str, files: dict[str, Path], seg: Path | None, dst: Path, overwrite: bool = False) -> Path:
    out = dst / f"{case}.nii.gz"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (--overwrite to replace it)")
    images = [nib.load(str(files[m])) for m in MODALITIES]
    ref = images[0]
    for m, img in zip(MODALITIES, images):
        if img.shape != ref.shape or len(img.shape) != 3:
            raise ValueError(f"{files[m]}: shape {img.shape}, expected 3D {ref.shape} as {files[MODALITIES[0]]}")
        if not np.allclose(img.affine, ref.affine, atol=1e-5):
            raise ValueError(f"{files[m]}: affine differs from {files[MODALITIES[0]]}'s; this tool does not resample")
    arrays = [np.asanyarray(img.dataobj) for img in images]
    data = np.stack(arrays, axis=-1).astype(np.result_type(*arrays), copy=False)
    header = ref.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)  # the values written are the scaled ones
    stacked = nib.Nifti1Image(data, ref.affine, header)
    stacked.set_sform(ref.affine, int(ref.header["sform_code"]))
    stacked.set_qform(ref.affine, int(ref.header["qform_code"]))
    dst.mkdir(parents=True, exist_ok=True)
    nib.save(stacked, str(out))
    if seg is not None:
        labels = dst / "labels" / "final"
        labels.mkdir(parents=True, exist_ok=True)
        target = labels / f"{case}.nii.gz"
        if seg.name.endswith(".nii.gz"):
            shutil.copyfile(seg, target)
        else:
            with open(seg, "rb") as fin, gzip.open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with BraTS case folders (searched recursively)")
    p.add_argument("dst", type=Path, help="MONAI Label studies folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace studies that exist")
    a = p.parse_args(argv)
    cases = find_cases(a.src)
    if not cases:
        print(f"no BraTS case folder (<case>/<case>_flair.nii.gz ... or <case>-t2f.nii.gz ...) under {a.src}",
              file=sys.stderr)
        return 1
    for case, files, seg in cases:
        out = convert_case(case, files, seg, a.dst, a.overwrite)
        print(f"{case}: {out}" + (" + labels/final" if seg is not None else ""))
    print(f"{len(cases)} case(s), {sum(s is not None for _, _, s in cases)} with labels, in {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
