"""Medical Segmentation Decathlon (MSD) datasets: read ``dataset.json``, check the files, make a seeded split."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

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
            path = (root / str(item[key])).resolve()
            if not path.is_file():
                raise InputDataError(f"{path}: listed in {root / 'dataset.json'} ('{where}') but not found")
            item[key] = str(path)
    return item


def check_nifti_headers(items: Sequence[dict[str, Any]], num_channels: int | None) -> None:
    """Read only the NIfTI headers of every image/label and check channels and shapes, before any data is loaded.

    Catches unreadable headers, wrong channel counts (channels are the 4th NIfTI axis in MSD) and label/image shape
    mismatches in seconds, so a long training or inference run does not fail half-way. The voxel data is checked
    when loaded (:class:`medseg_nets.transforms.CheckSegmentationInputd`).
    """
    for item in items:
        shapes = {}
        for key in ("image", "label"):
            if key not in item:
                continue
            try:
                shapes[key] = tuple(nib.load(item[key]).shape)
            except Exception as e:
                raise InputDataError(f"{item[key]}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
        img = shapes["image"]
        channels = img[3] if len(img) == 4 else 1
        if num_channels is not None and (len(img) not in (3, 4) or channels != num_channels):
            raise InputDataError(
                f"{item['image']}: shape {img} has {channels} channel(s), expected a 4D volume with {num_channels} "
                "channels on the last axis (X, Y, Z, C)"
            )
        if "label" in shapes and tuple(shapes["label"][:3]) != tuple(img[:3]):
            raise InputDataError(
                f"{item['label']}: label shape {shapes['label']} does not match image {item['image']} "
                f"spatial shape {img[:3]}"
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
    holds the ``dataset.json`` test entries that exist on disk, or the validation entries when there are none
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
    test = []
    for entry in meta.get("test", []):
        path = root / str(entry if isinstance(entry, str) else entry.get("image", ""))
        if path.is_file():
            test.append(_resolve(root, entry, "test"))
    train, val = seeded_split(sorted(training, key=lambda x: x["image"]), val_fraction, seed)
    lists = {"training": train, "validation": val, "test": test or [dict(v) for v in val]}
    if check_headers:
        check_nifti_headers(train + val + test, num_channels)
    if output_dir is not None and get_rank() == 0:
        record = {"dataset_dir": str(root.resolve()), "seed": seed, "val_fraction": val_fraction, **lists}
        atomic_write_json(Path(output_dir) / SPLIT_FILENAME, record)
    return lists
