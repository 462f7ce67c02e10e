"""ignite handlers for the bundles: crash-safe checkpoints, resume, metrics files, gradient clipping, progress."""

from .checkpoint import BestModelSaver, CheckpointLoader, CheckpointSaver, ResumeFromCheckpoint, unwrap
from .metrics_report import MetricsReport, summarise
from .training import GradientClipping, ProgressBar

__all__ = [
    "BestModelSaver",
    "CheckpointLoader",
    "CheckpointSaver",
    "GradientClipping",
    "MetricsReport",
    "ProgressBar",
    "ResumeFromCheckpoint",
    "summarise",
    "unwrap",
]
