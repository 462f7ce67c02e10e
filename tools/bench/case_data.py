"""The synthetic BraTS-like case of ``--cases``: a skull-stripped brain, zero outside, in a BraTS-sized field.

Real BraTS cases are 4 x 240 x 240 x 155 with zeros outside the brain, whose non-zero bounding box is about
140 x 170 x 140 voxels; the bundles' ``inference.json`` crop that foreground (``CropForegroundd``) before the sliding
window, so a random full-field volume is not what users see. :func:`brain_case` makes one such case from
``tools/make_demo_data.py``'s :func:`make_case` (a brain-shaped, randomly rotated ellipsoid with tissue texture, a
tumour, a bias field and noise in four MRI-like channels, exactly zero outside the brain): generated at the brain's
size, cropped to its non-zero bounding box, resampled (linear) to exactly ``brain`` voxels and zero-padded, centred,
into ``field``. :func:`write_case` writes it in the layouts the bundles read: one 4-channel NIfTI (MSD Task01's
layout, float32, what ``dalight3d`` reads natively) and one BraTS 2021 case folder (four int16 modality files with the
challenge's flipped affine, what ``glims`` and ``emcad`` read natively). :func:`cached_case` keeps the files under
``build/`` and reuses them while the recipe is the same.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

#: the real case: 4 channels, 240 x 240 x 155 voxels of 1 mm; the brain's non-zero bounding box in it
BRATS_FIELD = (240, 240, 155)
BRATS_BRAIN = (138, 169, 138)
#: bump when the recipe below changes: cached cases of another version are made again
RECIPE_VERSION = 1
BRATS_CASE = "BraTS2021_00000"
BRATS_SUFFIXES = ("_flair", "_t1", "_t1ce", "_t2")  # FLAIR, T1, T1ce, T2: make_case's channel order (MSD's)
MSD_NAME = "BRATS_001.nii.gz"


def scaled_sizes(scale: float = 1.0, field: Sequence[int] = BRATS_FIELD, brain: Sequence[int] = BRATS_BRAIN
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``field`` and ``brain`` scaled by ``scale`` (``--scale``), at least 8 voxels, the brain no larger than the
    field."""
    f = tuple(max(8, int(round(s * scale))) for s in field)
    b = tuple(min(max(4, int(round(s * scale))), fs) for s, fs in zip(brain, f))
    return f, b


def nonzero_extent(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) of the bounding box of the voxels that are non-zero in any channel of ``image`` (X, Y, Z, C);
    what ``CropForegroundd`` keeps (it keeps voxels > 0; the cases here have no negative values)."""
    mask = np.any(image != 0, axis=-1)
    if not mask.any():
        raise ValueError("the image is zero everywhere")
    starts, sizes = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        starts.append(int(hit[0]))
        sizes.append(int(hit[-1] - hit[0] + 1))
    return tuple(starts), tuple(sizes)


def brain_case(field: Sequence[int] = BRATS_FIELD, brain: Sequence[int] = BRATS_BRAIN, seed: int = 0
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """One BraTS-like case: image (X, Y, Z, 4) float32, a brain of exactly ``brain`` voxels (non-zero bounding box)
    centred in ``field``, zero outside; and a description (sizes, offset, value range)."""
    from scipy import ndimage

    from make_demo_data import make_case  # tools/ is on sys.path (tools/benchmark.py puts it there)

    field, brain = tuple(int(s) for s in field), tuple(int(s) for s in brain)
    if len(field) != 3 or len(brain) != 3 or any(b > f for b, f in zip(brain, field)):
        raise ValueError(f"brain {brain} must fit in the field {field} (3 spatial sizes each)")
    generated, _ = make_case(np.random.default_rng(seed), brain)
    start, size = nonzero_extent(generated)
    crop = generated[tuple(slice(s, s + n) for s, n in zip(start, size))]
    # corner-aligned linear resampling: output voxel 0 and B-1 of each axis sample the box's first and last plane,
    # so that the resampled brain's bounding box is exactly ``brain``
    step = [(n - 1) / (b - 1) if b > 1 else 0.0 for b, n in zip(brain, size)]
    channels = [ndimage.affine_transform(crop[..., c], step, output_shape=brain, order=1, mode="nearest")
                for c in range(crop.shape[-1])]
    resized = np.stack(channels, axis=-1).astype(np.float32)
    np.maximum(resized, 0, out=resized)  # the generated cases have no negative values; keep it so
    offset = tuple((f - b) // 2 for f, b in zip(field, brain))
    image = np.zeros(field + (resized.shape[-1],), np.float32)
    image[tuple(slice(o, o + n) for o, n in zip(offset, resized.shape[:3]))] = resized
    extent_start, extent = nonzero_extent(image)
    info = dict(field=list(field), brain=list(brain), seed=seed, offset=list(offset), extent_start=list(extent_start),
                extent=list(extent), generated_extent=list(size), channels=int(image.shape[-1]),
                max_value=float(image.max()), recipe_version=RECIPE_VERSION)
    return image, info


@dataclass
class CaseFiles:
    """Where :func:`cached_case` put the case: ``msd_file`` (one 4-channel NIfTI) and ``brats_dir`` (a folder holding
    one BraTS case folder), the recipe (``info``) and whether the files were reused."""

    folder: Path
    msd_file: Path
    brats_dir: Path
    info: dict[str, Any]
    reused: bool

    def input_for(self, bundle: str) -> tuple[Path, str]:
        """The ``--dataset_dir`` a bundle gets (its native layout) and the layout's name."""
        if bundle == "dalight3d":
            return self.msd_file, "one 4-channel NIfTI, float32 (MSD Task01 layout)"
        return self.brats_dir, "a BraTS 2021 case folder, four int16 modality files"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def write_case(folder: Path, image: np.ndarray, info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``image`` (X, Y, Z, 4) as ``folder/msd/BRATS_001.nii.gz`` (float32, identity affine) and as the BraTS
    case folder ``folder/brats/BraTS2021_00000/`` (int16 per modality, the challenge's affine), then ``info.json``
    (the recipe, written last: a case without it is made again)."""
    import nibabel as nib

    msd = folder / "msd" / MSD_NAME
    msd.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.eye(4)), msd)
    brats_dir = folder / "brats"
    case_dir = brats_dir / BRATS_CASE
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, image.shape[1] - 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    for c, suffix in enumerate(BRATS_SUFFIXES):
        nib.save(nib.Nifti1Image(np.round(image[..., c]).astype(np.int16), affine),
                 case_dir / f"{BRATS_CASE}{suffix}.nii.gz")
    (folder / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return msd, brats_dir


def case_tag(field: Sequence[int], brain: Sequence[int], seed: int) -> str:
    return (f"v{RECIPE_VERSION}_{'x'.join(map(str, field))}_brain{'x'.join(map(str, brain))}_seed{seed}")


def cached_case(root: Path, scale: float = 1.0, seed: int = 0, log=None) -> CaseFiles:
    """The case of ``--cases`` at ``scale`` under ``root/<tag>/``: reused when its ``info.json`` says the same
    recipe, else made (:func:`brain_case`) and written (:func:`write_case`)."""
    field, brain = scaled_sizes(scale)
    folder = Path(root) / case_tag(field, brain, seed)
    msd, brats_dir = folder / "msd" / MSD_NAME, folder / "brats"
    info_path = folder / "info.json"
    info: Optional[dict[str, Any]] = None
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = None
    files_there = msd.is_file() and all((brats_dir / BRATS_CASE / f"{BRATS_CASE}{s}.nii.gz").is_file()
                                        for s in BRATS_SUFFIXES)
    if info is not None and files_there and info.get("recipe_version") == RECIPE_VERSION \
            and info.get("field") == list(field) and info.get("brain") == list(brain) and info.get("seed") == seed:
        return CaseFiles(folder, msd, brats_dir, info, True)
    if log:
        log(f"making the synthetic case {'x'.join(map(str, field))} (brain {'x'.join(map(str, brain))}) in {folder}")
    if folder.exists():
        shutil.rmtree(folder)  # a partial or older case of this tag, written by this tool
    image, info = brain_case(field, brain, seed)
    write_case(folder, image, info)
    return CaseFiles(folder, msd, brats_dir, info, False)
