"""The pre- and post-processing of the GLIMS authors' BraTS 2023 inference (``yaziciz/GLIMS``, ``test_BraTS.py``),
written from its description, for ``bundles/glims/configs/inference_authors.json``.

Their pipeline, per case: the four modalities stacked as FLAIR, T1ce, T1, T2 (:class:`SelectChannelsd` reorders
this package's FLAIR, T1, T1ce, T2), channel-wise z-score over non-zero voxels, sliding-window inference of the
three region logits TC, WT, ET, then :class:`GLIMSBraTSPostprocessd`:

1. ``sigmoid``; a voxel is in TC where ``p_TC >= 0.6``, in WT where ``p_WT >= 0.5``, in ET where ``p_ET >= 0.6``;
   labels painted ED (2) for WT, then NCR (1) for TC, then ET (3) for ET;
2. each 26-connected ET component of fewer than 75 voxels whose mean ``p_ET`` is below 0.9 becomes NCR;
3. then each 26-connected NCR component of fewer than 75 voxels with mean ``p_TC`` below 0.9 becomes ED;
4. then each 26-connected ED component of fewer than 500 voxels with mean ``p_WT`` below 0.9 becomes background;
5. holes of the ET region (the authors call SimpleITK's ``BinaryFillhole`` with ``fullyConnected=True``: every
   26-connected component of non-ET voxels that does not touch the border of the volume) become NCR.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from medseg_nets.errors import InputDataError
from medseg_nets.transforms.brats import BRATS_CONVENTIONS, _item_convention

__all__ = [
    "SelectChannelsd",
    "threshold_regions_to_label",
    "relabel_small_components",
    "fill_enclosed",
    "glims_brats_postprocess",
    "GLIMSBraTSPostprocessd",
    "GLIMS_BRATS_CLEANUP",
]

#: the authors' small-component clean-up, applied in this order: (label, probability channel, components smaller
#: than this many voxels, whose mean probability is below this, become this label)
GLIMS_BRATS_CLEANUP = ((3, 2, 75, 0.9, 1), (1, 0, 75, 0.9, 2), (2, 1, 500, 0.9, 0))

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity in 3D


class SelectChannelsd(MapTransform):
    """Keep the channels ``channels`` of each key, in that order (e.g. ``[0, 2, 1, 3]`` swaps channels 1 and 2).

    MetaTensor metadata is kept. An image with too few channels raises :class:`InputDataError` naming its file.
    """

    def __init__(self, keys: KeysCollection, channels: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = [int(c) for c in channels]
        if not self.channels or min(self.channels) < 0:
            raise ValueError(f"channels must be non-negative channel indices, got {list(channels)}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] <= max(self.channels):
                name = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise InputDataError(
                    f"{name}: expected at least {max(self.channels) + 1} channels to select {self.channels}, "
                    f"got {img.shape[0]}"
                )
            d[key] = img[self.channels]
        return d


def threshold_regions_to_label(probs: np.ndarray, thresholds: Sequence[float] = (0.6, 0.5, 0.6)) -> np.ndarray:
    """Region probabilities ``(3, *spatial)`` (TC, WT, ET) -> BraTS 2023 labels (uint8, ``spatial``): a region holds
    where its probability is ``>= threshold`` (MONAI ``AsDiscrete(threshold=...)``); WT -> 2, then TC -> 1, then
    ET -> 3."""
    if probs.shape[0] != 3 or len(thresholds) != 3:
        raise ValueError(f"expected 3 region channels and 3 thresholds, got {probs.shape}, {list(thresholds)}")
    label = np.zeros(probs.shape[1:], dtype=np.uint8)
    label[probs[1] >= thresholds[1]] = 2
    label[probs[0] >= thresholds[0]] = 1
    label[probs[2] >= thresholds[2]] = 3
    return label


def relabel_small_components(
    label: np.ndarray, prob: np.ndarray, value: int, max_size: int, min_prob: float, new_value: int
) -> np.ndarray:
    """Every 26-connected component of ``label == value`` with fewer than ``max_size`` voxels and a mean ``prob``
    below ``min_prob`` becomes ``new_value`` (in place; returns ``label``)."""
    components, n = ndimage.label(label == value, structure=_FULL_CONNECTIVITY)
    if n == 0:
        return label
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(prob), components, ids)
    means = ndimage.mean(prob, components, ids)
    relabel = ids[(sizes < max_size) & (means < min_prob)]
    if relabel.size:
        label[np.isin(components, relabel)] = new_value
    return label


def fill_enclosed(label: np.ndarray, value: int = 3, fill_value: int = 1) -> np.ndarray:
    """Voxels of the 26-connected components of ``label != value`` that do not touch the border of the array (the
    holes of the ``value`` region, SimpleITK ``BinaryFillhole(fullyConnected=True)``) become ``fill_value`` (in
    place; returns ``label``)."""
    components, n = ndimage.label(label != value, structure=_FULL_CONNECTIVITY)
    if n == 0:
        return label
    border = np.zeros(label.shape, dtype=bool)
    for axis in range(label.ndim):
        index = [slice(None)] * label.ndim
        index[axis] = 0
        border[tuple(index)] = True
        index[axis] = -1
        border[tuple(index)] = True
    on_border = np.unique(components[border])
    enclosed = np.setdiff1d(np.arange(1, n + 1), on_border)
    if enclosed.size:
        label[np.isin(components, enclosed)] = fill_value
    return label


def glims_brats_postprocess(
    logits: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] = (0.6, 0.5, 0.6),
    cleanup: Sequence[Sequence[float]] = GLIMS_BRATS_CLEANUP,
    fill_holes: bool = True,
) -> np.ndarray:
    """The authors' BraTS 2023 post-processing (see the module docstring): region logits ``(3, *spatial)`` (TC, WT,
    ET) -> BraTS 2023 labels (uint8 ``spatial``: 0 background, 1 NCR, 2 ED, 3 ET)."""
    logits_t = torch.as_tensor(logits).detach().float().cpu()
    probs = torch.sigmoid(logits_t).numpy()
    label = threshold_regions_to_label(probs, thresholds)
    for value, channel, max_size, min_prob, new_value in cleanup:
        relabel_small_components(label, probs[int(channel)], int(value), int(max_size), float(min_prob), int(new_value))
    if fill_holes:
        fill_enclosed(label, 3, 1)
    return label


class GLIMSBraTSPostprocessd(MapTransform):
    """Region logits -> the GLIMS authors' post-processed BraTS label map (:func:`glims_brats_postprocess`),
    ``(1, *spatial)`` uint8 with MetaTensor metadata kept (for ``SaveImage``).

    The labels are BraTS 2023's (ET 3). The convention of an item is ``data[convention_key]`` when present (set per
    case by :func:`medseg_nets.data.brats_datalists`), else ``convention``; for ``"2021"`` the enhancing tumour is
    written as 4, so that a prediction is in its input's convention.

    Args:
        keys: the logits (3 channels TC, WT, ET, no activation applied).
        thresholds: probability thresholds of TC, WT, ET.
        cleanup: small-component rules, see :data:`GLIMS_BRATS_CLEANUP`.
        fill_holes: fill the holes of the enhancing tumour with NCR.
        convention: ``"2023"`` (the authors'), ``"2021"`` or ``"auto"`` (the item's convention, else 2023).
        convention_key: key of the item's convention.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        thresholds: Sequence[float] = (0.6, 0.5, 0.6),
        cleanup: Sequence[Sequence[float]] = GLIMS_BRATS_CLEANUP,
        fill_holes: bool = True,
        convention: str = "auto",
        convention_key: str | None = "brats_convention",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.thresholds = [float(t) for t in thresholds]
        self.cleanup = [tuple(rule) for rule in cleanup]
        self.fill_holes = bool(fill_holes)
        self.convention = convention
        self.convention_key = convention_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        convention = _item_convention(d, self.convention_key, self.convention)
        et = BRATS_CONVENTIONS["2021" if convention == "2021" else "2023"]["et"]
        for key in self.key_iterator(d):
            logits = d[key]
            label = glims_brats_postprocess(logits, self.thresholds, self.cleanup, self.fill_holes)
            if et != 3:
                label[label == 3] = et
            out = torch.from_numpy(label[None])
            if hasattr(logits, "meta"):
                out = logits.__class__(out, meta=logits.meta, applied_operations=logits.applied_operations)
            d[key] = out
        return d
