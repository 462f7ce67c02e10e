"""One input layer for every bundle: whatever ``--dataset_dir`` points at, the datalists a workflow needs.

``dataset_dir`` may be

- a **folder of images** (3D bundles: NIfTI volumes, 4-channel for the brain-tumour bundles; ``eamnet``: photos),
  directly in it or in ``imagesTs/``; for training, ``imagesTr/`` + ``labelsTr/`` paired by file name;
- the bundle's **native layout**: an MSD task folder with ``dataset.json`` (``kind="msd"`` and, for inference,
  ``kind="brats"``), BraTS case folders (``kind="brats"``), ISIC 2018 / PH2 (``kind="skin"``);
- a **single image file**;
- a **datalist JSON**: a list of entries (``"path"`` or ``{"image": ..., "label": ...}``) or a dict with
  ``"training"``/``"validation"``/``"test"`` (``"testing"``) lists; relative paths are relative to the JSON file.

:class:`Datalists` is what the bundle configs instantiate. It reads nothing when it is created, so that a
workflow can be built and introspected with no data present (``create_workflow(...)`` + ``check_properties()``):
the files are found, checked (headers only) and logged by :meth:`Datalists.start`, the first step of every
config's ``run``, before the first case is processed. Files are named by the path the user gave (links are not
resolved), every listed file must exist, and two inputs that would give the same output name are an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg_nets.data.msd import SPLIT_FILENAME, check_nifti_headers, seeded_split
from medseg_nets.errors import InputDataError
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_write_json, clear_provisional, provisional

__all__ = ["Datalists", "LazyDatalist", "KINDS", "find_datalists", "output_stem"]

logger = logging.getLogger(__name__)

KINDS = ("msd", "brats", "skin")
NIFTI_EXTS = (".nii.gz", ".nii")
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: file-name endings of masks and of this project's own outputs: never taken as images of a plain folder
_NOT_IMAGES = re.compile(r"(_seg|_segmentation|_mask|_lesion|_label|_overlay|_superpixels)$", re.IGNORECASE)
_MAX_LOGGED = 20


def _ext(path: str | Path) -> str:
    name = str(path).lower()
    return next((e for e in (*NIFTI_EXTS, *PHOTO_EXTS) if name.endswith(e)), "")


def output_stem(path: str | Path) -> str:
    """The file name without its image extension (``a/b.nii.gz`` -> ``b``): what a prediction is named after."""
    name = Path(str(path)).name
    ext = _ext(name)
    return name[: -len(ext)] if ext else name


def _abs(path: str | Path, base: Path | None = None) -> str:
    """Absolute and normalised, symbolic links kept (outputs are named after the path the user gave)."""
    p = Path(os.path.expanduser(str(path)))
    if base is not None and not p.is_absolute():
        p = base / p
    return os.path.abspath(p)


def _listing(paths: Sequence[str], limit: int = _MAX_LOGGED) -> str:
    more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return "\n  " + "\n  ".join(paths[:limit]) + more


class _Spec:
    """What a bundle reads: its kind, the image files it accepts and how it describes them."""

    def __init__(self, kind: str, num_channels: int | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.num_channels = num_channels
        self.exts = PHOTO_EXTS if kind == "skin" else NIFTI_EXTS
        if kind == "skin":
            self.what = "RGB photos (.jpg/.jpeg/.png/.bmp/.tif)"
        else:
            ch = f"{num_channels}-channel " if num_channels and num_channels > 1 else ""
            self.what = f"{ch}NIfTI volumes (.nii/.nii.gz)"

    def is_image(self, path: Path) -> bool:
        return path.is_file() and not path.name.startswith(".") and _ext(path) in self.exts

    def layouts(self) -> str:
        forms = [
            f"a folder of {self.what} (directly or in imagesTs/)",
            "a single such file",
            "a datalist JSON (a list of files, or {'training': [...], 'validation': [...], 'test': [...]})",
        ]
        native = {
            "msd": "an MSD task folder (dataset.json, imagesTr/, labelsTr/, imagesTs/)",
            "brats": "BraTS case folders (<case>/<case>_flair/_t1/_t1ce/_t2[/_seg].nii.gz, or the 2023 "
            "-t2f/-t1n/-t1c/-t2w[/-seg] names)",
            "skin": "ISIC 2018 task 1 (ISIC_<id>.jpg + ISIC_<id>_segmentation.png) or PH2 (IMD<nnn>/...) folders",
        }[self.kind]
        return "\n  - " + "\n  - ".join([native, *forms])


def _images_in(folder: Path, spec: _Spec) -> tuple[list[str], list[str]]:
    """Image files directly in ``folder`` (sorted) and the files skipped as masks/predictions."""
    images, skipped = [], []
    for p in sorted(folder.iterdir()):
        if spec.is_image(p):
            (skipped if _NOT_IMAGES.search(output_stem(p)) else images).append(_abs(p))
    return images, skipped


def _pair_by_name(images_dir: Path, labels_dir: Path, spec: _Spec) -> list[dict[str, str]]:
    images, _ = _images_in(images_dir, spec)
    labels = {output_stem(p): p for p in (_abs(q) for q in sorted(labels_dir.iterdir())) if spec.is_image(Path(p))}
    items, unpaired = [], []
    for img in images:
        stem = output_stem(img)
        lab = labels.get(stem) or labels.get(re.sub(r"_0000$", "", stem))  # nnU-Net names images <case>_0000
        if lab is None:
            unpaired.append(img)
        else:
            items.append({"image": img, "label": lab})
    if unpaired:
        raise InputDataError(
            f"{labels_dir}: no label for {len(unpaired)} image(s) of {images_dir}; expected a label file of the "
            f"same name for each:{_listing(unpaired)}"
        )
    return items


def _read_datalist_json(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{"training", "validation", "test"}`` lists (absolute paths) from a datalist or MSD ``dataset.json``;
    every listed file must exist (one error listing the missing ones)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputDataError(f"{path}: not a readable JSON file ({e}); expected a datalist") from e
    if isinstance(content, list):
        content = {"test": content}
    if not isinstance(content, dict):
        raise InputDataError(f"{path}: holds a {type(content).__name__}; expected a list of files or a dict of lists")
    base = path.parent
    lists: dict[str, list[dict[str, Any]]] = {}
    missing: list[str] = []
    for key, split in (("training", "training"), ("validation", "validation"), ("test", "test"), ("testing", "test")):
        entries = content.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InputDataError(f"{path}: '{key}' is a {type(entries).__name__}; expected a list of entries")
        for entry in entries:
            item = {"image": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
            if item is None or "image" not in item:
                raise InputDataError(f"{path}: an entry of '{key}' has no 'image': {entry!r}")
            for k in ("image", "label"):
                if k not in item:
                    continue
                files = item[k] if isinstance(item[k], list) else [item[k]]
                files = [_abs(f, base) for f in files]
                missing += [f"{f} (listed in '{key}')" for f in files if not Path(f).is_file()]
                item[k] = files if isinstance(item[k], list) else files[0]
            lists.setdefault(split, []).append(item)
    if missing:
        raise InputDataError(
            f"{path}: {len(missing)} listed file(s) not found (check the names, including upper/lower case):"
            f"{_listing(missing)}"
        )
    if not lists:
        raise InputDataError(f"{path}: no 'training', 'validation' or 'test' entries; expected a datalist")
    return lists


class Datalists(Mapping):
    """The datalists of ``dataset_dir`` for one bundle, found when the workflow runs (see the module doc).

    Args:
        dataset_dir: folder, file or datalist JSON (module doc).
        kind: ``"msd"`` (4D NIfTI, MSD native), ``"brats"`` (BraTS case folders or 4-channel NIfTI),
            ``"skin"`` (photos, ISIC 2018 / PH2 native).
        purpose: ``"inference"`` (``test`` is what is predicted; labels not needed) or ``"train"`` (labelled
            ``training``/``validation``, a seeded split unless the datalist gives ``validation``).
        output_dir: where the split is written (``datalist_split.json``, rank 0) and never read as input.
        val_fraction, seed: the split (:func:`medseg_nets.data.seeded_split`).
        num_channels: channels of an image (header check; a channel-first file is rejected).
        label_convention: BraTS label values (``"auto"``: from the case naming, ``"2021"`` for other files).
        dataset_format: ``kind="skin"``: ``"auto"``, ``"isic2018"`` or ``"ph2"`` for the native layouts.
        check_headers: read every header before the run (shapes, channels, truncation, grids).

    ``datalists["training"|"validation"|"test"|"labelled"]`` is a :class:`LazyDatalist` (``labelled``: training
    and validation together, e.g. to evaluate on a whole other dataset); the data are read on first use.
    """

    SPLITS = ("training", "validation", "test", "labelled")

    def __init__(
        self,
        dataset_dir: str,
        kind: str,
        purpose: str = "inference",
        output_dir: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_channels: int | None = None,
        label_convention: str = "auto",
        dataset_format: str = "auto",
        check_headers: bool = True,
    ) -> None:
        if purpose not in ("inference", "train"):
            raise ValueError(f"purpose must be 'inference' or 'train', got {purpose!r}")
        self.spec = _Spec(kind, num_channels)
        self.dataset_dir = str(dataset_dir)
        self.purpose = purpose
        self.output_dir = output_dir
        self.val_fraction = val_fraction
        self.seed = seed
        self.label_convention = label_convention
        self.dataset_format = dataset_format
        self.check_headers = check_headers
        self.layout: str | None = None
        self._lists: dict[str, list[dict[str, Any]]] | None = None
        self._handed_out: dict[str, int] = {}
        self._error: InputDataError | None = None
        self._running = False

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has been called (the workflow runs)."""
        return self._running

    # --- Mapping ---------------------------------------------------------------------------------------------
    def __getitem__(self, split: str) -> LazyDatalist:
        if split not in self.SPLITS:
            raise KeyError(f"{split!r}: datalists are {self.SPLITS}")
        return LazyDatalist(self, split)

    def __iter__(self) -> Iterator[str]:
        return iter(self.SPLITS)

    def __len__(self) -> int:
        return len(self.SPLITS)

    # --- building ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Mark the start of the run (the first step of a config's ``run``): from now on the data are found,
        checked and logged on first use (when the datasets are created, before the first case), and a failure is
        raised there. A workflow that uses no datalist (e.g. MONAI Label sets ``train#dataset#data`` itself) never
        reads ``dataset_dir``.

        Raises ``RuntimeError`` when parts of the workflow were created (e.g. by ``check_properties()``) while the
        data could not be read and the data are there now: those parts hold a stand-in length, so the workflow
        must be created again.
        """
        self._running = True
        clear_provisional()  # a new run: only what it writes is removed if it stops on bad input
        if self._error is None:
            self._write_split()  # when the lists were already read while the workflow was inspected
            return
        self._error, self._lists = None, None
        if not self._handed_out:
            return
        try:
            self._build()
        except InputDataError:
            return  # still unreadable: raised where the data are used
        raise RuntimeError(
            f"parts of this workflow were created before {self.dataset_dir} could be read (e.g. by "
            "check_properties()); create the workflow again to run it on the data now present"
        )

    def lists(self) -> dict[str, list[dict[str, Any]]]:
        """The datalists, built on first use. Before :meth:`start` (introspection), a failure is kept and raised
        on first access to an item instead (see :class:`LazyDatalist`)."""
        if self._lists is None and self._error is None:
            try:
                self._build()
            except InputDataError as e:
                if self._running:
                    raise
                self._error = e
        if self._error is not None:
            raise self._error
        assert self._lists is not None
        return self._lists

    def _build(self) -> dict[str, list[dict[str, Any]]]:
        lists, layout = find_datalists(
            self.dataset_dir, self.spec, self.purpose, output_dir=self.output_dir, val_fraction=self.val_fraction,
            seed=self.seed, label_convention=self.label_convention, dataset_format=self.dataset_format,
        )
        lists["labelled"] = sorted(lists["training"] + lists["validation"], key=lambda i: str(i["image"]))
        if self.check_headers:
            _check_headers(lists, self.spec, self.purpose)
        _check_unique_outputs(lists["test"] if self.purpose == "inference" else [], self.dataset_dir)
        self.layout, self._lists = layout, lists
        self._log(lists, layout)
        if self._running:
            self._write_split()
        return lists

    def _write_split(self) -> None:
        """``output_dir/datalist_split.json`` (rank 0, only once the run has started: inspecting a workflow writes
        nothing); removed again if the run then stops on bad input."""
        if self.output_dir is None or get_rank() != 0 or self._lists is None or self.layout is None:
            return
        record: dict[str, Any] = {"dataset_dir": _abs(self.dataset_dir), "layout": self.layout, "seed": self.seed,
                                  "val_fraction": self.val_fraction}
        if self.spec.kind == "brats":
            record["label_convention"] = self.label_convention
        if self.spec.kind == "skin":
            found = re.search(r"dataset_format (\w+)", self.layout)
            record["dataset_format"] = found.group(1) if found else "folder"
        record.update(self._lists)
        path = Path(self.output_dir) / SPLIT_FILENAME
        provisional(path)
        atomic_write_json(path, record)

    def _log(self, lists: dict[str, list[dict[str, Any]]], layout: str) -> None:
        def names(items: list[dict[str, Any]]) -> list[str]:
            return [str(i.get("case") or (i["image"][0] if isinstance(i["image"], list) else i["image"]))
                    for i in items]

        if self.purpose == "inference":
            cases = names(lists["test"])
            logger.info("dataset_dir %s: %s; %d case(s) to predict:%s", self.dataset_dir, layout, len(cases),
                        _listing(cases))
        else:
            logger.info("dataset_dir %s: %s; %d training and %d validation case(s); validation:%s",
                        self.dataset_dir, layout, len(lists["training"]), len(lists["validation"]),
                        _listing(names(lists["validation"])))


class LazyDatalist(Sequence):
    """One split of a :class:`Datalists`, read on first use. While a workflow is only being built and inspected
    (before :meth:`Datalists.start`) and the data cannot be read, its length is 1 so that datasets, samplers and
    engines can be created; any item access raises the input error, so nothing ever runs on a stand-in."""

    def __init__(self, owner: Datalists, split: str) -> None:
        self.owner = owner
        self.split = split

    def __len__(self) -> int:
        try:
            n = len(self.owner.lists()[self.split])
        except InputDataError:
            if self.owner._running:
                raise
            n = 1  # introspection without data: a placeholder length, never an item
        self.owner._handed_out[self.split] = n
        return n

    def __getitem__(self, index: Any) -> Any:
        return self.owner.lists()[self.split][index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.owner.lists()[self.split])

    def __add__(self, other: Sequence) -> list[dict[str, Any]]:
        return list(self) + list(other)

    def __radd__(self, other: Sequence) -> list[dict[str, Any]]:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"LazyDatalist({self.owner.dataset_dir!r}, {self.split!r})"


def _check_headers(lists: dict[str, list[dict[str, Any]]], spec: _Spec, purpose: str) -> None:
    items = lists["test"] if purpose == "inference" else lists["training"] + lists["validation"]
    if spec.kind == "skin":
        from medseg_nets.data.skin import check_skin_headers

        check_skin_headers(items)
        return
    cases = [i for i in items if isinstance(i["image"], list)]
    volumes = [i for i in items if not isinstance(i["image"], list)]
    if cases:
        from medseg_nets.data.brats import check_brats_headers

        check_brats_headers(cases)
    check_nifti_headers(volumes, spec.num_channels)


def _check_unique_outputs(items: list[dict[str, Any]], where: str) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for item in items:
        src = item["image"][0] if isinstance(item["image"], list) else item["image"]
        name = str(item.get("case") or output_stem(src))
        if name in seen:
            clashes.append(f"{src} and {seen[name]} (both '{name}')")
        seen[name] = src
    if clashes:
        raise InputDataError(
            f"{where}: {len(clashes)} input(s) would give predictions of the same name; expected unique file "
            f"names:{_listing(clashes)}"
        )


def find_datalists(
    dataset_dir: str,
    spec: _Spec | str,
    purpose: str = "inference",
    output_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    label_convention: str = "auto",
    dataset_format: str = "auto",
    num_channels: int | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``({"training", "validation", "test"}, layout description)`` for ``dataset_dir`` (see the module doc);
    reads no image data. Raises :class:`InputDataError` naming the path and the accepted forms."""
    if isinstance(spec, str):
        spec = _Spec(spec, num_channels)
    root = Path(os.path.expanduser(str(dataset_dir)))
    train = purpose == "train"

    def split(labelled: list[dict[str, Any]], given_val: list[dict[str, Any]] | None = None):
        if given_val:
            return labelled, given_val
        return seeded_split(labelled, val_fraction, seed)

    def need_labels(items: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        unlabelled = [str(i["image"]) for i in items if "label" not in i]
        if unlabelled or not items:
            raise InputDataError(
                f"{where}: training needs every image with its label ({len(unlabelled)} without, "
                f"{len(items) - len(unlabelled)} with); expected one of:{spec.layouts()}"
                + (f"\nwithout a label:{_listing(unlabelled)}" if unlabelled else "")
            )
        return items

    if not root.exists():
        raise InputDataError(f"{root}: dataset_dir does not exist; expected (set it with --dataset_dir) one of:"
                             f"{spec.layouts()}")
    # --- a single file ------------------------------------------------------------------------------------------
    if root.is_file():
        if root.name.lower().endswith(".json"):
            given = _read_datalist_json(root)
            if spec.kind != "skin":
                _set_brats_convention(given, spec)
            test = given.get("test", [])
            if train:
                labelled = need_labels(given.get("training", []) or test, str(root))
                tr, va = split(labelled, given.get("validation"))
                return {"training": tr, "validation": va, "test": test}, f"datalist {root.name}"
            if not test:
                if not given.get("validation"):
                    raise InputDataError(f"{root}: no 'test' entries to predict; expected a list of files or a "
                                         "'test' list")
                logger.warning("%s: no 'test' entries: predicting its 'validation' entries", root)
                test = [dict(v) for v in given["validation"]]
            return {"training": given.get("training", []), "validation": given.get("validation", []),
                    "test": test}, f"datalist {root.name}"
        if _ext(root) not in spec.exts:
            raise InputDataError(f"{root}: not a file this bundle reads; expected one of:{spec.layouts()}")
        if spec.kind == "brats":
            from medseg_nets.data.brats import brats_case_name

            case = brats_case_name(root)
            if case is not None:
                raise InputDataError(
                    f"{root}: one modality file of BraTS case {case}; expected its case folder (--dataset_dir "
                    f"{root.parent}) or one 4-channel NIfTI file (FLAIR, T1, T1ce, T2 on the last axis)"
                )
        if train:
            raise InputDataError(f"{root}: a single image cannot be trained on; expected one of:{spec.layouts()}")
        return {"training": [], "validation": [], "test": [_item(_abs(root), spec, label_convention)]}, "single file"
    if not root.is_dir() or not any(root.iterdir()):
        raise InputDataError(f"{root}: dataset_dir is empty; expected one of:{spec.layouts()}")
    # --- native layouts -----------------------------------------------------------------------------------------
    if (root / "dataset.json").is_file():
        if spec.kind == "skin":
            raise InputDataError(f"{root / 'dataset.json'}: an MSD dataset.json; this bundle reads photos, "
                                 f"expected one of:{spec.layouts()}")
        return _msd(root, spec, train, val_fraction, seed), "MSD task folder (dataset.json)"
    if spec.kind == "brats":
        from medseg_nets.data.brats import brats_datalists, find_brats_files

        if find_brats_files(root, [Path(output_dir)] if output_dir else []):
            lists = brats_datalists(str(root), None, val_fraction, seed, label_convention, require_labels=train,
                                    check_headers=False)
            if not train and not any("label" not in i for i in lists["test"]):
                _log_fallback(root, lists["test"])
            return lists, "BraTS case folders"
    if spec.kind == "skin":
        from medseg_nets.data.skin import find_skin_layout

        found = find_skin_layout(root, dataset_format)
        if found is not None:
            fmt, labelled, unlabelled, others = found
            name = {"isic2018": "ISIC 2018 task 1 folder", "ph2": "PH2 folder"}[fmt]
            if others:
                logger.warning("%s: %d image file(s) not named as in the %s are %s:%s", root, len(others), name,
                               "not used for training" if train else "predicted as well",
                               _listing([o["image"] for o in others]))
            tr, va = split(need_labels(labelled, str(root)) if train else labelled)
            test = sorted([{"image": x["image"]} for x in labelled] + unlabelled + others, key=lambda x: x["image"])
            return {"training": tr, "validation": va, "test": test}, f"{name} (dataset_format {fmt})"
    # --- plain folders ------------------------------------------------------------------------------------------
    if train:
        if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
            labelled = _pair_by_name(root / "imagesTr", root / "labelsTr", spec)
            labelled = [_item(i["image"], spec, label_convention, i["label"]) for i in labelled]
            tr, va = split(need_labels(labelled, str(root)))
            return {"training": tr, "validation": va, "test": []}, "folder with imagesTr/ and labelsTr/"
        raise InputDataError(f"{root}: no labelled data found for training; expected one of:{spec.layouts()}\n"
                             "  - for training: imagesTr/ and labelsTr/ with a label of the same name per image")
    folder = root / "imagesTs" if (root / "imagesTs").is_dir() else root
    images, skipped = _images_in(folder, spec)
    if skipped:
        logger.warning("%s: %d file(s) named like masks or predictions are not predicted:%s", folder, len(skipped),
                       _listing(skipped))
    if not images:
        raise InputDataError(f"{folder}: no {spec.what} found; expected one of:{spec.layouts()}")
    layout = f"folder of {spec.what}" + (" (imagesTs/)" if folder != root else "")
    return {"training": [], "validation": [], "test": [_item(p, spec, label_convention) for p in images]}, layout


def _item(image: str, spec: _Spec, label_convention: str, label: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"image": image}
    if label is not None:
        item["label"] = label
    if spec.kind == "brats":
        item["brats_convention"] = "2021" if label_convention == "auto" else str(label_convention)
    return item


def _set_brats_convention(given: dict, spec: _Spec) -> None:
    """Entries of a datalist JSON for a BraTS bundle: BraTS 2018-2021 label values unless the entry says."""
    if spec.kind == "brats":
        for items in given.values():
            for i in items:
                i.setdefault("brats_convention", "2021")


def _log_fallback(root: Path, cases: list[dict[str, Any]]) -> None:
    names = [str(c.get("case") or c["image"]) for c in cases]
    logger.warning(
        "%s: every case has a segmentation, so inference predicts the %d held-out validation case(s) of the seeded "
        "split:%s", root, len(names), _listing(names)
    )


def _msd(root: Path, spec: _Spec, train: bool, val_fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    meta_file = root / "dataset.json"
    given = _read_datalist_json(meta_file)
    training = given.get("training", [])
    if spec.kind == "brats":
        if train:
            raise InputDataError(
                f"{meta_file}: an MSD task folder; its labels (1 edema, 2 non-enhancing, 3 enhancing) are not BraTS "
                "labels, so this bundle does not train on it (train dalight3d on MSD data, or give BraTS case "
                "folders)"
            )
        for i in training + given.get("test", []):
            i["brats_convention"] = "2021"
    if train:
        if not training:
            raise InputDataError(f"{meta_file}: has no 'training' entries; expected a list of {{'image', 'label'}}")
        for item in training:
            if "label" not in item:
                raise InputDataError(f"{meta_file}: training entry {item['image']} has no 'label'")
    tr, va = seeded_split(sorted(training, key=lambda x: x["image"]), val_fraction, seed) if training else ([], [])
    test = given.get("test", [])
    if not train and not test:
        if not va:
            raise InputDataError(f"{meta_file}: lists no 'test' images and no 'training' images to hold out")
        _log_fallback(root, va)
        test = [{k: v for k, v in i.items() if k != "label"} for i in va]
    return {"training": tr, "validation": va, "test": test}
