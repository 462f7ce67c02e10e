"""Transforms MONAI lacks: input checks that name the bad file, label-to-channel conversion, identifiers."""

from .checks import CheckSegmentationInputd, EnsureIdentifierd, LoadImageCheckedd, source_name
from .labels import LabelsToChannelsd, labels_to_channels

__all__ = [
    "CheckSegmentationInputd",
    "EnsureIdentifierd",
    "LabelsToChannelsd",
    "LoadImageCheckedd",
    "labels_to_channels",
    "source_name",
]
