"""ignite handlers for the bundles: crash-safe checkpoints, resume, metrics files, gradient clipping, progress."""

from .checkpoint import (
    BestModelSaver,
    CheckpointError,
    CheckpointLoader,
    CheckpointSaver,
    MissingCheckpointError,
    ResumeFromCheckpoint,
    unwrap,
)
from .confusion import ConfusionMatrixPerCase
from .metrics_report import MetricsReport, summarise
from .training import FinalValidationHandler, GradientClipping, ProgressBar

__all__ = [
    "BestModelSaver",
    "CheckpointError",
    "CheckpointLoader",
    "CheckpointSaver",
    "ConfusionMatrixPerCase",
    "FinalValidationHandler",
    "GradientClipping",
    "MetricsReport",
    "MissingCheckpointError",
    "ProgressBar",
    "ResumeFromCheckpoint",
    "summarise",
    "unwrap",
]
