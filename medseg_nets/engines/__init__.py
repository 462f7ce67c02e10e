"""Batch preparation for MONAI engines."""

from .prepare_batch import PrepareBatchWithIdentifier

__all__ = ["PrepareBatchWithIdentifier"]
