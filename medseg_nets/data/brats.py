"""BraTS challenge folders (2018-2021 and 2023+ naming): datalists, checks and a seeded split.

Layouts read (one folder per case, anywhere under ``dataset_dir``; ``.nii.gz`` or ``.nii``):

- BraTS 2018-2021 (``naming="2021"``)::

      BraTS2021_00000/BraTS2021_00000_flair.nii.gz  _t1.nii.gz  _t1ce.nii.gz  _t2.nii.gz  [_seg.nii.gz]
      BraTS20_Training_001/BraTS20_Training_001_flair.nii  ...

- BraTS 2023+ (GLI, MEN, MET, PED, SSA; ``naming="2023"``)::

      BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz  -t1n  -t1c  -t2w  [-seg]

Every item has ``"image"``: the four modality files in the fixed order :data:`MODALITIES` = FLAIR, T1, T1ce, T2
(2023 names: t2f, t1n, t1c, t2w), which ``LoadImaged`` + ``EnsureChannelFirstd`` stack into a 4-channel image
(channel 0 FLAIR, 1 T1, 2 T1ce, 3 T2); ``"label"`` (the segmentation, when the case has one); ``"case"`` (the case
id, e.g. ``BraTS2021_00000``) and ``"brats_convention"`` (``"2021"``: labels 0/1/2/4, ``"2023"``: 0/1/2/3; see
:mod:`medseg_nets.transforms.brats`), which the label transforms and the prediction writer use per case.
The datalists are at volume level; a 2D bundle slices the loaded volumes itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg_nets.data.msd import SPLIT_FILENAME, check_nifti_headers, seeded_split
from medseg_nets.errors import InputDataError
from medseg_nets.transforms.brats import normalize_brats_convention
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_write_json

__all__ = ["MODALITIES", "NAMINGS", "brats_datalists", "find_brats_files", "brats_case_name", "brats_name_formatter", "check_brats_headers"]

logger = logging.getLogger(__name__)

#: modality order of the stacked image (channel index = position)
MODALITIES = ("flair", "t1", "t1ce", "t2")
#: file-name suffix of each modality and of the segmentation, per naming scheme
NAMINGS: dict[str, dict[str, str]] = {
    "2021": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}
_SUFFIXES = {suffix: (naming, key) for naming, table in NAMINGS.items() for key, suffix in table.items()}
_PATTERN = re.compile(
    r"^(?P<case>.+?)(?P<suffix>" + "|".join(sorted(map(re.escape, _SUFFIXES), key=len, reverse=True))
    + r")(?P<ext>\.nii(?:\.gz)?)$"
)


def brats_case_name(filename: str | os.PathLike) -> str | None:
    """The case id of a BraTS file name (``.../BraTS2021_00000_t1ce.nii.gz`` -> ``BraTS2021_00000``), or None."""
    m = _PATTERN.match(Path(str(filename)).name)
    return m.group("case") if m else None


def brats_name_formatter(metadict: Mapping | None, saver: Any) -> dict[str, Any]:
    """``SaveImage(output_name_formatter=...)``: name a prediction after its case (``<case>_<postfix>.nii.gz``)
    rather than after its first modality file; other files keep their own name (as MONAI's default formatter)."""
    src = (metadict or {}).get("filename_or_obj", getattr(saver, "_data_index", 0))
    if isinstance(src, (list, tuple)):
        src = src[0] if src else getattr(saver, "_data_index", 0)
    case = brats_case_name(str(src))
    patch_index = (metadict or {}).get("patch_index", None)
    return {"subject": f"{case}.nii.gz" if case else f"{src}", "idx": patch_index}


def _scan(root: Path, skip: Sequence[Path]) -> dict[tuple[Path, str], dict[str, Any]]:
    """Group the BraTS files under ``root`` by (folder, case)."""
    groups: dict[tuple[Path, str], dict[str, Any]] = {}
    skip_resolved = [s.resolve() for s in skip]
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip_resolved)
        for name in sorted(files):
            if name.startswith("."):
                continue
            m = _PATTERN.match(name)
            if not m:
                continue
            naming, key = _SUFFIXES[m.group("suffix")]
            group = groups.setdefault((here, m.group("case")), {"files": {}, "namings": set()})
            if key in group["files"]:  # both .nii and .nii.gz
                raise InputDataError(
                    f"{here}: case {m.group('case')} has two {key} files ({Path(group['files'][key]).name}, {name}); "
                    "expected one"
                )
            group["files"][key] = str(here / name)
            group["namings"].add(naming)
    return groups


def find_brats_files(root: str | os.PathLike, skip: Sequence[Path] = ()) -> bool:
    """Whether any BraTS-named file (``<case>_flair.nii.gz``, ``<case>-t2f.nii.gz``, ...) is under ``root``."""
    groups = _scan(Path(root), skip)
    _drop_strays(groups, log=False)
    return bool(groups)


def _drop_strays(groups: dict[tuple[Path, str], dict[str, Any]], log: bool = True) -> None:
    """Remove, with a warning, the groups that are not cases: files of only a segmentation (e.g. predictions
    written into the data folder) and stray files of a case folder's own case whose names merely end like a
    modality (``<case>/<case>_flair_to_t2.nii.gz`` reads as case ``<case>_flair_to``)."""
    for (folder, case), group in list(groups.items()):
        keys = set(group["files"])
        own = (folder, folder.name) in groups and case != folder.name and case.startswith(folder.name)
        if own or keys == {"seg"}:
            why = "an extra file of case " + folder.name if own else "a segmentation without the four modalities"
            if log:
                names = ", ".join(sorted(Path(p).name for p in group["files"].values()))
                logger.warning("%s: ignored %s (%s)", folder, names, why)
            del groups[(folder, case)]


def _expected_names(case: str, naming: str) -> str:
    return ", ".join(f"{case}{NAMINGS[naming][k]}.nii.gz" for k in (*MODALITIES, "seg"))


def check_brats_headers(items: Sequence[Mapping[str, Any]]) -> None:
    """Header-level preflight of BraTS items (reads no voxel data): every file readable and complete (via
    :func:`medseg_nets.data.check_nifti_headers`), every modality and the segmentation a 3D volume on the grid of
    the FLAIR (same shape and affine, as MONAI needs to stack them). Raises :class:`InputDataError` naming the file."""
    for item in items:
        files = list(item["image"]) + ([item["label"]] if "label" in item else [])
        check_nifti_headers([{"image": f} for f in files], None)
        ref_path, ref_shape, ref_affine = None, None, None
        for path in files:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
                raise InputDataError(f"{path}: shape {shape}; expected a 3D volume (one modality or label per file)")
            if ref_path is None:
                ref_path, ref_shape, ref_affine = path, shape[:3], img.affine
                continue
            if shape[:3] != ref_shape:
                raise InputDataError(
                    f"{path}: shape {shape[:3]} does not match {ref_path} {ref_shape}; the four modalities and the "
                    "segmentation of a case must share one voxel grid"
                )
            if not np.allclose(img.affine, ref_affine):
                raise InputDataError(
                    f"{path}: affine {np.round(img.affine, 4).tolist()} does not match {ref_path} "
                    f"{np.round(ref_affine, 4).tolist()}; the four modalities and the segmentation of a case must "
                    "share one voxel grid"
                )


def brats_datalists(
    dataset_dir: str,
    output_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_convention: str = "auto",
    require_labels: bool = True,
    check_headers: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Datalists of a BraTS folder tree (2018-2021 or 2023+ naming, see the module doc; both may be mixed).

    Returns ``{"training": [...], "validation": [...], "test": [...]}``. ``training``/``validation`` are a seeded
    split (:func:`medseg_nets.data.seeded_split`) of the cases that have a segmentation, sorted by case id;
    ``test`` holds the cases without a segmentation (e.g. a BraTS validation set) or, when every case has one, the
    validation cases (inference then predicts the held-out cases). With ``output_dir`` the split is written to
    ``output_dir/datalist_split.json`` (global rank 0).

    Args:
        dataset_dir: folder searched recursively for case folders.
        output_dir: where to write the split; its own files are never read as cases.
        val_fraction, seed: the split.
        label_convention: ``"auto"`` (per case from the naming: 2018-2021 names -> ``"2021"``, labels 0/1/2/4;
            2023 names -> ``"2023"``, labels 0/1/2/3), or ``"2021"``/``"2020"``/``"2023"`` for every case.
        require_labels: every case must have its segmentation (training); otherwise unlabelled cases go to
            ``test``.
        check_headers: run :func:`check_brats_headers` on every item.

    Raises :class:`InputDataError` naming the folder and file for a missing modality or segmentation, duplicate
    case ids, mixed naming within a case, or header mismatches; and when no case is found.
    """
    root = Path(dataset_dir).expanduser()
    convention = normalize_brats_convention(label_convention, allow_auto=True)
    if not root.is_dir() or not any(root.iterdir()):
        raise InputDataError(
            f"{root}: dataset_dir is missing or empty; expected BraTS case folders such as "
            "BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz or "
            "BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz (set it with --dataset_dir)"
        )
    skip = [Path(output_dir)] if output_dir is not None else []
    groups = _scan(root, skip)
    _drop_strays(groups)
    if not groups:
        raise InputDataError(
            f"{root}: no BraTS files found; expected case folders with <case>_flair/_t1/_t1ce/_t2[/_seg].nii.gz "
            "(BraTS 2018-2021) or <case>-t2f/-t1n/-t1c/-t2w[/-seg].nii.gz (BraTS 2023+)"
        )
    labelled, unlabelled, seen = [], [], {}
    for (folder, case), group in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        namings = group["namings"]
        if len(namings) > 1:
            raise InputDataError(
                f"{folder}: case {case} mixes BraTS 2018-2021 (_flair, _t1ce, ...) and 2023 (-t2f, -t1c, ...) file "
                f"names ({', '.join(sorted(Path(p).name for p in group['files'].values()))}); expected one scheme"
            )
        naming = next(iter(namings))
        if case in seen:
            raise InputDataError(
                f"{folder}: case id {case} also found in {seen[case]}; case ids must be unique (predictions are "
                "named after them)"
            )
        seen[case] = folder
        files = group["files"]
        needed = list(MODALITIES) + (["seg"] if require_labels else [])
        for key in needed:
            if key not in files:
                what = "segmentation" if key == "seg" else f"{key.upper()} modality"
                raise InputDataError(
                    f"{folder}: case {case} lacks {folder / (case + NAMINGS[naming][key] + '.nii.gz')} (the {what}); "
                    f"expected the files {_expected_names(case, naming)}"
                    + (" (the segmentation is needed for training and evaluation)" if key == "seg" else "")
                )
        item: dict[str, Any] = {
            "image": [files[k] for k in MODALITIES],
            "case": case,
            "brats_convention": naming if convention == "auto" else convention,
        }
        if "seg" in files:
            item["label"] = files["seg"]
            labelled.append(item)
        else:
            unlabelled.append(item)
    if require_labels and not labelled:
        raise InputDataError(f"{root}: no case with a segmentation; training and evaluation need labelled cases")
    train, val = seeded_split(labelled, val_fraction, seed) if labelled else ([], [])
    lists = {
        "training": train,
        "validation": val,
        "test": unlabelled or [dict(v) for v in val],
    }
    if check_headers:
        check_brats_headers(train + val + unlabelled)
    if output_dir is not None and get_rank() == 0:
        record = {"dataset_dir": str(root.resolve()), "seed": seed, "val_fraction": val_fraction,
                  "label_convention": label_convention, **lists}
        atomic_write_json(Path(output_dir) / SPLIT_FILENAME, record)
    return lists
