"""Training a 2D network on slices of 3D volumes, with MONAI's own transforms.

A 2D bundle (e.g. EMCAD on BraTS) loads a whole volume, preprocesses it in 3D (orientation, spacing, intensity), and
then cuts ``num_samples`` one-slice volumes from it with MONAI's ``RandCropByPosNegLabeld`` (tumour-biased choice of
the slice and, when the plane is larger than the crop, of the in-plane window), using a crop whose size is 1 along
the slice axis. The samples stay 3D, ``(C, H, W, 1)`` for ``slice_axis=2``, and are augmented in plane by MONAI's 3D
transforms with ranges that leave the slice axis alone::

    SpatialPadd(spatial_size=slice_roi_size(roi, axis))
    RandCropByPosNegLabeld(spatial_size=slice_roi_size(roi, axis), num_samples=N, ...)
    RandFlipd(spatial_axis=in_plane_axes(axis)[0]), RandFlipd(spatial_axis=in_plane_axes(axis)[1])
    RandAffined(rotate_range=slice_rotate_range(r, axis), scale_range=in_plane_range(s, axis), ...)

The network takes them as volumes of one slice (``EMCADNet(slice_axis=axis)``: slices along ``axis`` go through its
2D forward), and the same network takes whole volumes at validation and inference, through MONAI's
``SlidingWindowInferer(roi_size=slice_roi_size(roi, axis, -1), sigma_scale=slice_sigma_scale(0.125, axis))``:
in-plane windows of the training size (a smaller plane is zero-padded to it, a larger one tiled with overlapping
windows blended in plane), each window holding every slice. After
``Orientationd(axcodes="RAS")`` the axial axis is 2 (inferior -> superior). These helpers keep the crop and the
augmentation in step with one ``roi_size`` and one ``slice_axis`` config entry.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["slice_roi_size", "slice_sigma_scale", "in_plane_axes", "in_plane_range", "slice_rotate_range"]


def _check_axis(slice_axis: int) -> int:
    axis = int(slice_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of a 3D volume), got {slice_axis!r}")
    return axis


def slice_roi_size(roi_size: Sequence[int], slice_axis: int = 2, depth: int = 1) -> list[int]:
    """The 3D size of ``depth`` slices of in-plane size ``roi_size`` perpendicular to ``slice_axis``.

    ``slice_roi_size([256, 256], 2) == [256, 256, 1]`` (a one-slice training crop of a RAS volume),
    ``slice_roi_size([256, 192], 0) == [1, 256, 192]``; ``depth=-1``: every slice, the sliding-window size that
    MONAI's ``SlidingWindowInferer`` reads as "the whole axis" (``[256, 256, -1]``: in-plane windows of
    ``roi_size``, each one a stack of all the slices, for a network that takes volumes slice by slice).
    """
    roi = [int(s) for s in roi_size]
    if len(roi) != 2 or min(roi) < 1:
        raise ValueError(f"roi_size must be two positive in-plane sizes, got {list(roi_size)!r}")
    if int(depth) != -1 and int(depth) < 1:
        raise ValueError(f"depth must be a positive number of slices or -1 (all), got {depth!r}")
    axis = _check_axis(slice_axis)
    return roi[:axis] + [int(depth)] + roi[axis:]


def slice_sigma_scale(sigma_scale: float = 0.125, slice_axis: int = 2) -> list[float]:
    """``SlidingWindowInferer(mode="gaussian", sigma_scale=...)`` for windows that hold every slice
    (:func:`slice_roi_size` with ``depth=-1``): ``sigma_scale`` in plane and an infinite sigma (a flat weight of
    exactly 1) along ``slice_axis``, so that overlapping windows blend in plane only, with the same weights as
    MONAI's ``SliceInferer`` gives each slice's 2D windows (a finite sigma along the slice axis would change them
    where MONAI clamps small weights)."""
    axis = _check_axis(slice_axis)
    return [float("inf") if a == axis else float(sigma_scale) for a in (0, 1, 2)]


def in_plane_axes(slice_axis: int = 2) -> list[int]:
    """The two spatial axes of a slice perpendicular to ``slice_axis`` (for ``RandFlipd(spatial_axis=...)``):
    ``in_plane_axes(2) == [0, 1]``, ``in_plane_axes(0) == [1, 2]``."""
    axis = _check_axis(slice_axis)
    return [a for a in (0, 1, 2) if a != axis]


def in_plane_range(value: float, slice_axis: int = 2) -> list[float]:
    """A per-axis range of a 3D random transform that acts in plane only: ``value`` on the two in-plane axes, 0 on
    ``slice_axis`` (e.g. ``RandAffined(scale_range=...)``: no scaling across slices)."""
    axis = _check_axis(slice_axis)
    return [0.0 if a == axis else float(value) for a in (0, 1, 2)]


def slice_rotate_range(value: float, slice_axis: int = 2) -> list[float]:
    """``RandAffined(rotate_range=...)`` for a rotation within the slice plane only: in 3D, MONAI's i-th angle
    rotates about spatial axis i, so ``value`` about ``slice_axis`` and 0 about the two others."""
    axis = _check_axis(slice_axis)
    return [float(value) if a == axis else 0.0 for a in (0, 1, 2)]
