"""Medical Segmentation Decathlon (MSD) datasets: read ``dataset.json``, check the files, make a seeded split."""

from __future__ import annotations

import gzip
import os
import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg_nets.errors import InputDataError
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_write_json

__all__ = ["msd_datalists", "seeded_split", "check_nifti_headers"]

SPLIT_FILENAME = "datalist_split.json"


def seeded_split(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle ``items`` with ``random.Random(seed)`` and cut off ``round(val_fraction * n)`` (at least 1 when n > 1)
    for validation. Returns ``(training, validation)``; the same seed and items always give the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(items)
    random.Random(seed).shuffle(order)
    n_val = round(val_fraction * len(order))
    if len(order) > 1 and val_fraction > 0:
        n_val = min(max(n_val, 1), len(order) - 1)
    return order[n_val:], order[:n_val]


def _resolve(root: Path, entry: Any, where: str) -> dict[str, Any]:
    item = {"image": entry} if isinstance(entry, str) else dict(entry)
    if "image" not in item:
        raise InputDataError(f"{root / 'dataset.json'}: an entry of '{where}' has no 'image': {entry!r}")
    for key in ("image", "label"):
        if key in item:
            path = Path(os.path.abspath(root / str(item[key])))  # links kept: outputs are named after them
            if not path.is_file():
                raise InputDataError(f"{path}: listed in {root / 'dataset.json'} ('{where}') but not found")
            item[key] = str(path)
    return item


def _truncation(path: str, img: Any) -> str | None:
    """Why a single-file NIfTI holds less data than its header announces, or ``None``; reads no voxel data.

    ``.nii``: the file size. ``.nii.gz``: the gzip trailer (ISIZE, the uncompressed size modulo 2**32); only when it
    disagrees (a truncated file, or a legitimate multi-member gzip) is the stream decompressed to be sure.
    """
    proxy = getattr(img, "dataobj", None)
    offset = getattr(proxy, "offset", None)
    if offset is None or not hasattr(proxy, "shape") or not hasattr(proxy, "dtype"):
        return None  # not a file-backed single-file image: nothing cheap to check
    need = int(offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    p = Path(path)
    if p.name.endswith(".nii"):
        size = p.stat().st_size
        return None if size >= need else f"file is truncated: {size} bytes, the header announces {need}"
    if not p.name.endswith(".gz"):
        return None
    with open(p, "rb") as f:
        f.seek(-4, 2)
        if int.from_bytes(f.read(4), "little") == need % 2**32:
            return None
    size = 0
    try:
        with gzip.open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"file is truncated or corrupt ({type(e).__name__}: {e})"
    return None if size >= need else f"file is truncated: {size} bytes uncompressed, the header announces {need}"


def _header_problems(item: dict[str, Any], num_channels: int | None) -> list[str]:
    """What is wrong with one datalist item, judged from its NIfTI headers: ``"<file>: <problem>; expected ..."``."""
    shapes, problems = {}, []
    expected = "a complete, readable NIfTI (.nii/.nii.gz) file"
    for key in ("image", "label"):
        if key not in item:
            continue
        try:
            img = nib.load(item[key])
            shapes[key] = tuple(img.shape)
            problem = _truncation(item[key], img)
        except Exception as e:
            problem = f"cannot be read as NIfTI ({type(e).__name__}: {e})"
        if problem:
            problems.append(f"{item[key]}: {problem}; expected {expected}")
    img = shapes.get("image")
    if img is None:
        return problems
    channels = img[3] if len(img) == 4 else 1
    if num_channels is not None and num_channels > 1 and len(img) == 4 and img[0] == num_channels:
        # NIfTI keeps channels on the 4th axis; (C, X, Y, Z) would be read as a volume of C voxels across, and when
        # Z == C as well it would even pass the channel count and give a label map of the wrong shape
        problems.append(
            f"{item['image']}: shape {img} looks channel-first ({num_channels} on the first axis); expected a 4D "
            f"volume with the {num_channels} channels on the last axis (X, Y, Z, C), as NIfTI stores them "
            "(e.g. nibabel: nib.Nifti1Image(np.moveaxis(data, 0, -1), affine))"
        )
    elif num_channels is not None and (len(img) not in (3, 4) or channels != num_channels):
        problems.append(
            f"{item['image']}: shape {img} has {channels} channel(s), expected a 4D volume with {num_channels} "
            "channels on the last axis (X, Y, Z, C)"
        )
    if "label" in shapes and (tuple(shapes["label"][:3]) != tuple(img[:3]) or any(s != 1 for s in shapes["label"][3:])):
        problems.append(
            f"{item['label']}: label shape {shapes['label']} does not match image {item['image']} "
            f"shape {img}; expected a 3D label map of spatial shape {img[:3]}"
        )
    return problems


def check_nifti_headers(items: Sequence[dict[str, Any]], num_channels: int | None, max_listed: int = 20) -> None:
    """Read only the NIfTI headers of every image/label and check channels and shapes, before any data is loaded.

    Catches unreadable headers, truncated files (cheaply, see :func:`_truncation`), wrong channel counts (channels
    are the 4th NIfTI axis in MSD) and label/image shape mismatches in seconds, so a long training or inference run
    does not fail half-way or leave part of its output written. The voxel values (label values, NaN) are checked when
    loaded (:class:`medseg_nets.transforms.CheckSegmentationInputd`).

    Raises one :class:`InputDataError` for all bad files (one line each, ``"<file>: <problem>; expected ..."``,
    at most ``max_listed`` of them), so that a dataset can be fixed in one go.
    """
    problems = [p for item in items for p in _header_problems(item, num_channels)]
    if len(problems) == 1:
        raise InputDataError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise InputDataError(
            f"{len(problems)} problems with the input files:\n  " + "\n  ".join(problems[:max_listed]) + more
        )


def msd_datalists(
    dataset_dir: str,
    output_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_channels: int | None = None,
    check_headers: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Datalists of an MSD task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``).

    Returns ``{"training": [...], "validation": [...], "test": [...]}`` with absolute paths. ``training`` and
    ``validation`` are a seeded split of the ``dataset.json`` training entries (see :func:`seeded_split`); ``test``
    holds the ``dataset.json`` test entries (each must exist), or the validation entries when there are none
    (the MSD test labels are not public; inference then predicts the held-out validation cases).
    Extra keys of an entry (e.g. an integer ``identifier``) are kept. When ``output_dir`` is given the split is
    written to ``output_dir/datalist_split.json`` so that a run can be repeated and audited.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir() or not any(root.iterdir()):
        raise InputDataError(
            f"{root}: dataset_dir is missing or empty; expected an MSD task folder with dataset.json, imagesTr/ and "
            "labelsTr/ (set it with --dataset_dir)"
        )
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise InputDataError(f"{meta_file}: not found; expected the MSD dataset.json describing imagesTr/labelsTr")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputDataError(f"{meta_file}: not valid JSON ({e})") from e
    training = [_resolve(root, e, "training") for e in meta.get("training", [])]
    if not training:
        raise InputDataError(f"{meta_file}: has no 'training' entries; expected a list of {{'image', 'label'}}")
    for item in training:
        if "label" not in item:
            raise InputDataError(f"{meta_file}: training entry {item['image']} has no 'label'")
    test = [_resolve(root, e, "test") for e in meta.get("test", [])]  # a listed file that is missing is an error
    train, val = seeded_split(sorted(training, key=lambda x: x["image"]), val_fraction, seed)
    lists = {"training": train, "validation": val, "test": test or [dict(v) for v in val]}
    if check_headers:
        check_nifti_headers(train + val + test, num_channels)
    if output_dir is not None and get_rank() == 0:
        record = {"dataset_dir": str(root.resolve()), "seed": seed, "val_fraction": val_fraction, **lists}
        atomic_write_json(Path(output_dir) / SPLIT_FILENAME, record)
    return lists
