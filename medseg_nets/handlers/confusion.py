"""A confusion-matrix metric handler whose per-case details are metric values (for :class:`MetricsReport`)."""

from __future__ import annotations

from typing import Any

import torch
from monai.handlers import ConfusionMatrix
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

__all__ = ["ConfusionMatrixPerCase"]


class ConfusionMatrixPerCase(ConfusionMatrix):
    """MONAI's ``ConfusionMatrix`` handler (accuracy, precision, sensitivity, specificity, "f1 score" = Dice,
    "threat score" = IoU, ...) that saves the metric **value** of every case in ``engine.state.metric_details``.

    MONAI's handler saves the raw per-case confusion counts ``(cases, channels, 4)`` as details; this one keeps them
    for the aggregate and stores ``(cases, channels)`` metric values instead, which
    :class:`medseg_nets.handlers.MetricsReport` writes per case and summarises (NaN where a case's metric is
    undefined, e.g. precision of an empty prediction). ``compute_sample=True`` (the default here) makes the
    aggregate the mean over cases; ``False`` computes it from the confusion counts summed over all cases ("pooled",
    as some papers report), and the per-case details stay per case either way.
    """

    def __init__(
        self,
        include_background: bool = True,
        metric_name: str = "hit_rate",
        compute_sample: bool = True,
        reduction: str = "mean",
        output_transform: Any = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            include_background=include_background,
            metric_name=metric_name,
            compute_sample=compute_sample,
            reduction=reduction,
            output_transform=output_transform,
            save_details=save_details,
        )
        self.metric_name = metric_name

    def compute(self) -> Any:
        result = super().compute()
        if self.save_details and self._engine is not None and self._name is not None:
            counts = torch.as_tensor(self._engine.state.metric_details[self._name])
            self._engine.state.metric_details[self._name] = compute_confusion_matrix_metric(self.metric_name, counts)
        return result
