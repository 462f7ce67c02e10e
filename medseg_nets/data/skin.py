"""Dermoscopy skin-lesion datasets: ISIC 2018 task 1 and PH2, found in their published layouts.

- **ISIC 2018 task 1** (lesion boundary segmentation): images ``ISIC_<7 digits>.jpg`` (the challenge's
  ``ISIC2018_Task1-2_{Training,Validation,Test}_Input/`` folders) and masks ``ISIC_<id>_segmentation.png``
  (``ISIC2018_Task1_{Training,Validation}_GroundTruth/``). Files are matched by id wherever they are under
  ``dataset_dir``; the ``ISIC_<id>_superpixels.png`` files of the input folders and anything else are ignored.
- **PH2** (Mendonça et al., EMBC 2013): one folder a case, ``IMD<nnn>/IMD<nnn>_Dermoscopic_Image/IMD<nnn>.bmp``
  and ``IMD<nnn>/IMD<nnn>_lesion/IMD<nnn>_lesion.bmp`` (the ``_roi`` folders are ignored).

Masks are 8-bit grey images with 0 = background and 255 = lesion. :func:`skin_datalists` finds the files, checks
that every file can be opened and that each mask has its image's size (headers only, seconds for thousands of
files), and makes the seeded training/validation split, written to ``output_dir/datalist_split.json``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from medseg_nets.data.msd import SPLIT_FILENAME, seeded_split
from medseg_nets.errors import InputDataError
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_write_json

__all__ = [
    "SKIN_FORMATS",
    "check_skin_headers",
    "detect_skin_format",
    "exif_orientation",
    "find_isic2018",
    "find_ph2",
    "find_skin_layout",
    "grey_mask",
    "rgb_image",
    "skin_datalists",
]

logger = logging.getLogger(__name__)

SKIN_FORMATS = ("isic2018", "ph2")
_ISIC_IMAGE = re.compile(r"^(ISIC_\d+)\.jpe?g$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)
_PH2_CASE = re.compile(r"^IMD\d+$", re.IGNORECASE)
_LAYOUTS = {
    "isic2018": "ISIC 2018 task 1: ISIC_<id>.jpg images and ISIC_<id>_segmentation.png masks (e.g. in "
    "ISIC2018_Task1-2_Training_Input/ and ISIC2018_Task1_Training_GroundTruth/)",
    "ph2": "PH2: IMD<nnn>/IMD<nnn>_Dermoscopic_Image/IMD<nnn>.bmp images and IMD<nnn>/IMD<nnn>_lesion/"
    "IMD<nnn>_lesion.bmp masks",
}


def _walk_files(root: Path) -> Iterable[Path]:
    """Every file under ``root`` (folder links followed), skipping hidden files and folders (e.g. macOS ``._*``)."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _add(found: dict[str, Path], key: str, path: Path, what: str) -> None:
    if key in found:
        raise InputDataError(
            f"{path}: {what} {key} is also at {found[key]}; expected each case once under dataset_dir "
            "(remove the copy or point dataset_dir at one of them)"
        )
    found[key] = path


def _pair(images: dict[str, Path], masks: dict[str, Path]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    labelled = [{"image": str(images[k]), "label": str(masks[k])} for k in sorted(images) if k in masks]
    unlabelled = [{"image": str(images[k])} for k in sorted(images) if k not in masks]
    orphans = sorted(k for k in masks if k not in images)
    if orphans:
        logger.warning(
            "%d mask(s) without an image are ignored, e.g. %s", len(orphans), ", ".join(str(masks[k]) for k in orphans[:3])
        )
    return labelled, unlabelled


def find_isic2018(root: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """ISIC 2018 task 1 files under ``root``: ``(labelled [{image, label}], unlabelled [{image}])``, by id."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in _walk_files(Path(root)):
        if m := _ISIC_IMAGE.match(path.name):
            _add(images, m.group(1).upper(), path, "image")
        elif m := _ISIC_MASK.match(path.name):
            _add(masks, m.group(1).upper(), path, "mask")
    return _pair(images, masks)


def find_ph2(root: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """PH2 files under ``root``: ``(labelled [{image, label}], unlabelled [{image}])``, by case folder."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in _walk_files(Path(root)):
        if path.suffix.lower() != ".bmp" or len(path.parts) < 3:
            continue
        case_dir, sub = path.parent.parent, path.parent.name
        case = case_dir.name
        if not _PH2_CASE.match(case):
            continue
        if sub.lower() == f"{case}_dermoscopic_image".lower() and path.stem.lower() == case.lower():
            _add(images, case.upper(), path, "image")
        elif sub.lower() == f"{case}_lesion".lower() and path.stem.lower() == f"{case}_lesion".lower():
            _add(masks, case.upper(), path, "mask")
    return _pair(images, masks)


_FINDERS = {"isic2018": find_isic2018, "ph2": find_ph2}


def detect_skin_format(root: str | Path) -> str:
    """``"isic2018"`` or ``"ph2"``: the layout whose files are under ``root`` (an error when none or both are)."""
    found = [name for name, find in _FINDERS.items() if any(find(root))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputDataError(
            f"{root}: no skin-lesion images found; expected one of these layouts under dataset_dir:\n  - "
            + "\n  - ".join(_LAYOUTS.values())
        )
    raise InputDataError(
        f"{root}: holds both ISIC 2018 and PH2 files; set dataset_format to 'isic2018' or 'ph2' "
        "(--dataset_format ph2) or point dataset_dir at one dataset"
    )


def find_skin_layout(root: str | Path, dataset: str = "auto") -> tuple[str, list, list, list] | None:
    """``(format, labelled, unlabelled, others)`` (format ``"isic2018"`` or ``"ph2"``) of the ISIC 2018 or PH2
    files under ``root``, or ``None`` when neither is there (``dataset="auto"``). ``others``: image files under
    ``root`` that the layout does not name (e.g. a ``.png`` photo next to the ``ISIC_*.jpg`` ones), not masks; the
    caller decides what to do."""
    name = _format_name(dataset)
    if name == "auto":
        found = [n for n, find in _FINDERS.items() if any(find(root))]
        if not found:
            return None
        name = detect_skin_format(root)
    labelled, unlabelled = _FINDERS[name](root)
    used = {str(x[k]) for x in labelled + unlabelled for k in ("image", "label") if k in x}
    unused = [str(p) for p in _walk_files(Path(root)) if str(p) not in used
              and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
              and not re.search(r"_(superpixels|segmentation|lesion|roi)$|_Lesion$", p.stem, re.IGNORECASE)]
    others = [{"image": p} for p in unused]
    return name, labelled, unlabelled, others


def _format_name(dataset: str) -> str:
    name = str(dataset).strip().lower().replace("_", "").replace("-", "")
    name = {"isic": "isic2018", "isic2018": "isic2018", "ph2": "ph2", "auto": "auto"}.get(name, name)
    if name not in ("auto", *_FINDERS):
        raise ValueError(f"dataset_format must be 'auto', 'isic2018' or 'ph2', got {dataset!r}")
    return name


def _open_size(path: str, what: str) -> tuple[int, int]:
    """Width and height of the image as viewers show it (EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ...
        raise InputDataError(f"{path}: cannot be read ({type(e).__name__}: {e}); expected a readable {what}") from e


def check_skin_headers(items: Sequence[dict[str, Any]]) -> None:
    """Open every image and mask (headers only) and check that each mask has its image's width and height.

    Catches unreadable files and mismatched sizes before a long run starts; pixel values (masks 0/255 only) are
    checked when the data is loaded (:class:`medseg_nets.transforms.CheckSegmentationInputd`).
    """
    for item in items:
        size = _open_size(item["image"], "RGB dermoscopy image (JPEG/PNG/BMP)")
        if "label" in item:
            msize = _open_size(item["label"], "lesion mask (PNG/BMP)")
            if msize != size:
                raise InputDataError(
                    f"{item['label']}: mask size {msize[0]}x{msize[1]} (width x height) does not match image "
                    f"{item['image']} {size[0]}x{size[1]}; expected a mask of the image's size"
                )


def skin_datalists(
    dataset_dir: str,
    output_dir: str | None = None,
    dataset: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    check_headers: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Datalists of an ISIC 2018 task 1 or PH2 folder (layout detected with ``dataset="auto"``).

    Returns (absolute paths, sorted)::

        {"training": [{image, label}], "validation": [{image, label}],   # seeded split of the labelled cases
         "labelled": [{image, label}],                                     # every labelled case
         "test": [{image}]}                                                # every image found, labelled or not

    ``training``/``validation`` come from :func:`medseg_nets.data.seeded_split` over the labelled cases sorted by
    path. ``test`` is what inference predicts (every image under ``dataset_dir``, e.g. also the ISIC test inputs,
    which have no masks). When ``output_dir`` is given the split is written to ``output_dir/datalist_split.json``
    (global rank 0 only) so that a run can be repeated and audited.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir() or not any(root.iterdir()):
        raise InputDataError(
            f"{root}: dataset_dir is missing or empty; expected one of these layouts (set it with --dataset_dir):\n"
            "  - " + "\n  - ".join(_LAYOUTS.values())
        )
    name = str(dataset).strip().lower().replace("_", "").replace("-", "")
    name = {"isic": "isic2018", "isic2018": "isic2018", "ph2": "ph2", "auto": "auto"}.get(name, name)
    if name == "auto":
        name = detect_skin_format(root)
    if name not in _FINDERS:
        raise ValueError(f"dataset_format must be 'auto', 'isic2018' or 'ph2', got {dataset!r}")
    labelled, unlabelled = _FINDERS[name](root)
    if not labelled and not unlabelled:
        raise InputDataError(f"{root}: no images found; expected {_LAYOUTS[name]}")
    train, val = seeded_split(labelled, val_fraction, seed)
    test = sorted([{"image": x["image"]} for x in labelled] + unlabelled, key=lambda x: x["image"])
    lists = {"training": train, "validation": val, "labelled": labelled, "test": test}
    if check_headers:
        check_skin_headers(labelled + unlabelled)
    if output_dir is not None and get_rank() == 0:
        record = {"dataset_dir": str(root.resolve()), "dataset_format": name, "seed": seed,
                  "val_fraction": val_fraction, **lists}
        atomic_write_json(Path(output_dir) / SPLIT_FILENAME, record)
    return lists


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of ``img`` (1 = as stored, 2-8 = mirrored and/or rotated), 1 when absent."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: take the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def rgb_image(img: Image.Image) -> Image.Image:
    """PIL converter for dermoscopy images: the EXIF orientation applied (the photo as viewers show it; the PNG
    mask writer undoes it), then colour modes (RGBA, palette, CMYK, YCbCr) to RGB; grey images are left alone so
    that the channel check reports them (a dermoscopy image has 3 channels)."""
    img = _oriented(img)
    if img.mode in ("RGB", "L", "LA", "1", "I", "F", "I;16", "I;16B", "I;16L"):
        return img
    return img.convert("RGB")


def _oriented(img: Image.Image) -> Image.Image:
    if exif_orientation(img) == 1:
        return img
    filename = getattr(img, "filename", None)
    out = ImageOps.exif_transpose(img)
    if filename:
        out.filename = filename  # type: ignore[attr-defined]
    return out


def grey_mask(img: Image.Image) -> Image.Image:
    """PIL converter for lesion masks: 1-bit images to 8-bit 0/255, palette and grey+alpha images to grey, and
    colour images whose three bands are equal to one band. Anything else (e.g. a mask drawn in colour, a 16-bit
    mask) is left alone so that the checks that follow name the file and say what was expected. The EXIF
    orientation is applied, as for the photo."""
    img = _oriented(img)
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA", "LA"):
        return img.convert("L")
    if img.mode in ("RGB", "RGBA"):
        r, g, b = img.split()[:3]
        if r.tobytes() == g.tobytes() == b.tobytes():
            return r
    return img
