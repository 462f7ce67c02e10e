"""Transforms MONAI lacks: input checks that name the bad file, label-to-channel conversion, identifiers."""

from .checks import CheckSegmentationInputd, EnsureIdentifierd, LoadImageCheckedd, source_name
from .labels import LabelsToChannelsd, labels_to_channels
from .skin import RandColorJitterd, color_jitter
from .brats import (
    BRATS_CONVENTIONS,
    BRATS_REGION_NAMES,
    BraTSLabelToRegionsd,
    RegionsToBraTSLabeld,
    brats_label_to_regions,
    brats_regions_to_label,
    detect_brats_convention,
    normalize_brats_convention,
)

__all__ = [
    "CheckSegmentationInputd",
    "EnsureIdentifierd",
    "LabelsToChannelsd",
    "LoadImageCheckedd",
    "labels_to_channels",
    "RandColorJitterd",
    "color_jitter",
    "source_name",
]
__all__ += [
    "BRATS_CONVENTIONS",
    "BRATS_REGION_NAMES",
    "BraTSLabelToRegionsd",
    "RegionsToBraTSLabeld",
    "brats_label_to_regions",
    "brats_regions_to_label",
    "detect_brats_convention",
    "normalize_brats_convention",
]
from .slices import slice_channel_dim, slice_roi_size  # noqa: E402
__all__ += ["slice_channel_dim", "slice_roi_size"]
