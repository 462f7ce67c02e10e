"""Exceptions raised for bad input data, so that callers can tell them from programming errors."""

from __future__ import annotations

__all__ = ["InputDataError"]


class InputDataError(ValueError):
    """Input data that does not match what a bundle expects.

    The message always names the offending file (or folder) and what was expected, e.g.
    ``"/data/imagesTr/BRATS_001.nii.gz: 3 channel(s), expected 4 (FLAIR, T1w, T1gd, T2w)"``.
    """
