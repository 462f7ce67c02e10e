"""BraTS label maps <-> the three overlapping tumour regions TC / WT / ET, in either BraTS label convention.

BraTS label conventions (``convention`` below):

============ ============================================== ========================================
convention   labels                                          used by
============ ============================================== ========================================
``"2021"``   0 background, 1 necrotic / non-enhancing core   BraTS 2018-2021 (also given as "2020")
             (NCR/NET), 2 edema (ED), 4 enhancing tumour (ET)
``"2023"``   0 background, 1 non-enhancing core (NETC),      BraTS 2023+ (GLI, MEN, MET, PED, SSA)
             2 surrounding FLAIR hyperintensity (SNFH),
             3 enhancing tumour (ET)
============ ============================================== ========================================

Regions, always in the order TC, WT, ET (as MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``):
TC (tumour core) = 1 + ET, WT (whole tumour) = 1 + 2 + ET, ET (enhancing tumour) = ET label (4 or 3).

A per-case convention travels with the data item (key ``brats_convention``, set by
:func:`medseg_nets.data.brats_datalists` from the file naming, or by the user), so that a prediction is written back
in the convention of its input. :class:`BraTSLabelToRegionsd` can also detect it from the label values
(``"auto"``) and records what it found under the same key.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medseg_nets.errors import InputDataError
from medseg_nets.transforms.checks import source_name

__all__ = [
    "BRATS_CONVENTIONS",
    "BRATS_REGION_NAMES",
    "BraTSLabelToRegionsd",
    "RegionsToBraTSLabeld",
    "brats_label_to_regions",
    "brats_regions_to_label",
    "detect_brats_convention",
    "normalize_brats_convention",
]

#: label values and enhancing-tumour label of each convention
BRATS_CONVENTIONS: dict[str, dict[str, Any]] = {
    "2021": {"labels": (0, 1, 2, 4), "et": 4, "desc": "BraTS 2018-2021: 0 background, 1 NCR/NET, 2 ED, 4 ET"},
    "2023": {"labels": (0, 1, 2, 3), "et": 3, "desc": "BraTS 2023+: 0 background, 1 NETC, 2 SNFH, 3 ET"},
}
BRATS_REGION_NAMES = ("TC", "WT", "ET")
_ALIASES = {"2018": "2021", "2019": "2021", "2020": "2021", "2021": "2021", "2023": "2023", "2024": "2023"}


def normalize_brats_convention(convention: Any, allow_auto: bool = False) -> str:
    """``"2021"`` or ``"2023"`` (or ``"auto"`` when allowed) from a year given as str or int; ValueError otherwise."""
    c = str(convention).strip().lower()
    if allow_auto and c == "auto":
        return "auto"
    if c not in _ALIASES:
        allowed = sorted(_ALIASES) + (["auto"] if allow_auto else [])
        raise ValueError(f"unknown BraTS label convention {convention!r}; expected one of {allowed}")
    return _ALIASES[c]


def _values(label: torch.Tensor) -> list[float]:
    return [float(v) for v in torch.unique(torch.as_tensor(label))]


def detect_brats_convention(label: torch.Tensor, default: str = "2021", name: str | None = None) -> str:
    """The convention of a label map from its values: 4 present -> ``"2021"``, 3 present -> ``"2023"``, neither
    (no enhancing tumour) -> ``default``. Both present is an :class:`InputDataError` naming the file."""
    found = set(_values(label))
    if 3.0 in found and 4.0 in found:
        raise InputDataError(
            f"{name or source_name(label)}: label has both 3 and 4; a BraTS label map uses either 4 (BraTS 2018-2021) "
            "or 3 (BraTS 2023+) for the enhancing tumour"
        )
    if 4.0 in found:
        return "2021"
    if 3.0 in found:
        return "2023"
    return normalize_brats_convention(default)


def _check_values(label: torch.Tensor, convention: str, name: str) -> None:
    allowed = BRATS_CONVENTIONS[convention]["labels"]
    lab = torch.as_tensor(label)
    if torch.is_floating_point(lab) and not bool(torch.isfinite(lab).all()):
        raise InputDataError(f"{name}: label contains NaN/infinite values; expected {list(allowed)}")
    unknown = sorted(v for v in _values(lab) if v != int(v) or int(v) not in allowed)
    if unknown:
        unknown_str = [int(v) if v == int(v) else v for v in unknown]
        hint = ""
        if convention == "2021" and unknown_str == [3]:
            hint = " (3 is the enhancing tumour of BraTS 2023+: set label_convention to '2023')"
        elif convention == "2023" and unknown_str == [4]:
            hint = " (4 is the enhancing tumour of BraTS 2018-2021: set label_convention to '2021')"
        raise InputDataError(
            f"{name}: label values {unknown_str} are not among the expected {list(allowed)} "
            f"({BRATS_CONVENTIONS[convention]['desc']}){hint}"
        )


def brats_label_to_regions(label: torch.Tensor, convention: str = "2021", check: bool = True) -> torch.Tensor:
    """A one-channel BraTS label map ``(1, *spatial)`` -> float32 regions ``(3, *spatial)`` in the order TC, WT, ET.

    Works for any number of spatial dimensions (3D volumes, 2D slices). With ``check`` (default), values outside the
    convention's labels raise :class:`InputDataError` naming the label file. MetaTensor metadata is kept.
    """
    convention = normalize_brats_convention(convention)
    if label.shape[0] != 1:
        raise InputDataError(
            f"{source_name(label)}: label has {label.shape[0]} channels (shape {tuple(label.shape)}); expected one "
            "channel holding a BraTS label map"
        )
    if check:
        _check_values(label, convention, source_name(label))
    lab = torch.as_tensor(label)[0]
    et = BRATS_CONVENTIONS[convention]["et"]
    is_et = lab == et
    tc = (lab == 1) | is_et
    wt = tc | (lab == 2)
    result = torch.stack([tc, wt, is_et]).to(torch.float32)
    if hasattr(label, "meta"):  # keep MetaTensor metadata (affine, filename, applied operations)
        result = label.__class__(result, meta=label.meta, applied_operations=label.applied_operations)
    return result


def brats_regions_to_label(regions: torch.Tensor, convention: str = "2021", threshold: float = 0.5) -> torch.Tensor:
    """Regions ``(3, *spatial)`` (TC, WT, ET; probabilities or binary) -> a one-channel label map in ``convention``.

    A voxel is in a region where its value is ``> threshold``. Labels are painted from the outside in (the standard
    BraTS post-processing for nested regions): WT -> 2, TC -> 1, ET -> 4 (``"2021"``) or 3 (``"2023"``), so an
    enhancing voxel is enhancing even where the independent sigmoid outputs disagree on the larger regions.
    The result is ``uint8``; MetaTensor metadata is kept (for ``SaveImage``).
    """
    convention = normalize_brats_convention(convention)
    if regions.shape[0] != 3:
        raise ValueError(f"expected 3 region channels (TC, WT, ET), got shape {tuple(regions.shape)}")
    r = torch.as_tensor(regions) > threshold
    label = torch.zeros(r.shape[1:], dtype=torch.uint8, device=r.device)
    label[r[1]] = 2
    label[r[0]] = 1
    label[r[2]] = BRATS_CONVENTIONS[convention]["et"]
    label = label[None]
    if hasattr(regions, "meta"):
        label = regions.__class__(label, meta=regions.meta, applied_operations=regions.applied_operations)
    return label


def _item_convention(d: Mapping[Hashable, Any], key: str | None, default: str) -> str:
    value = d.get(key) if key else None
    if isinstance(value, (list, tuple)):  # collated batch of one
        value = value[0] if len(value) else None
    return normalize_brats_convention(value if value is not None else default, allow_auto=True)


class BraTSLabelToRegionsd(MapTransform):
    """Turn BraTS label maps into the TC/WT/ET region channels (see :func:`brats_label_to_regions`).

    The convention of an item is ``data[convention_key]`` when present (set per case by
    :func:`medseg_nets.data.brats_datalists`), else ``convention``. ``"auto"`` detects it from the label values
    (:func:`detect_brats_convention`, ``default`` when there is no enhancing tumour) and writes the result to
    ``data[convention_key]``, so that later transforms and the prediction writer use the same convention.
    Unknown label values raise :class:`InputDataError` naming the label file.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        convention: str = "auto",
        convention_key: str | None = "brats_convention",
        default: str = "2021",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convention = normalize_brats_convention(convention, allow_auto=True)
        self.convention_key = convention_key
        self.default = normalize_brats_convention(default)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        convention = _item_convention(d, self.convention_key, self.convention)
        for key in self.key_iterator(d):
            label = d[key]
            if convention == "auto":
                convention = detect_brats_convention(label, self.default)
            d[key] = brats_label_to_regions(label, convention)
        if self.convention_key and convention != "auto":
            d[self.convention_key] = convention
        return d


class RegionsToBraTSLabeld(MapTransform):
    """Turn TC/WT/ET region predictions into a single BraTS label map (see :func:`brats_regions_to_label`).

    The convention of an item is ``data[convention_key]`` when present (the input's convention, carried from the
    datalist), else ``convention`` (``"2021"`` or ``"2023"``).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        convention: str = "2021",
        convention_key: str | None = "brats_convention",
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convention = normalize_brats_convention(convention)
        self.convention_key = convention_key
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        convention = _item_convention(d, self.convention_key, self.convention)
        if convention == "auto":
            convention = self.convention
        for key in self.key_iterator(d):
            d[key] = brats_regions_to_label(d[key], convention, self.threshold)
        return d
