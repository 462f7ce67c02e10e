"""Training a 2D network on slices of 3D volumes, with MONAI's own transforms.

A 2D bundle (e.g. EMCAD on BraTS) loads a whole volume, preprocesses it in 3D (orientation, spacing, intensity), and
then cuts ``num_samples`` slices from it with MONAI's ``RandCropByPosNegLabeld`` (tumour-biased choice of the slice
and, when the plane is larger than the network input, of the in-plane window), using a crop whose size is 1 along
the slice axis, followed by ``SqueezeDimd`` on that axis::

    SpatialPadd(spatial_size=slice_roi_size(roi, axis))
    RandCropByPosNegLabeld(spatial_size=slice_roi_size(roi, axis), num_samples=N, ...)
    SqueezeDimd(dim=slice_channel_dim(axis))          # (C, H, W, 1) -> (C, H, W)

At inference MONAI's ``SliceInferer(roi_size=roi, spatial_dim=axis)`` runs the 2D network on every slice of the
volume along the same axis (with sliding windows in plane when the plane is larger than ``roi``). After
``Orientationd(axcodes="RAS")`` the axial axis is 2 (inferior -> superior). These helpers keep the two in step from one
``roi_size`` and one ``slice_axis`` config entry.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["slice_roi_size", "slice_channel_dim"]


def _check_axis(slice_axis: int) -> int:
    axis = int(slice_axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of a 3D volume), got {slice_axis!r}")
    return axis


def slice_roi_size(roi_size: Sequence[int], slice_axis: int = 2) -> list[int]:
    """The 3D crop size that cuts one slice of in-plane size ``roi_size`` perpendicular to ``slice_axis``.

    ``slice_roi_size([256, 256], 2) == [256, 256, 1]`` (axial slices of a RAS volume),
    ``slice_roi_size([256, 192], 0) == [1, 256, 192]``.
    """
    roi = [int(s) for s in roi_size]
    if len(roi) != 2 or min(roi) < 1:
        raise ValueError(f"roi_size must be two positive in-plane sizes, got {list(roi_size)!r}")
    axis = _check_axis(slice_axis)
    return roi[:axis] + [1] + roi[axis:]


def slice_channel_dim(slice_axis: int = 2) -> int:
    """The dimension of a channel-first ``(C, X, Y, Z)`` tensor to squeeze after a one-slice crop along
    ``slice_axis`` (``SqueezeDimd(dim=...)``): ``slice_axis + 1``."""
    return _check_axis(slice_axis) + 1
