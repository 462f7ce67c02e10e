"""Pass an optional per-case identifier from the batch to the network as a keyword argument."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch

__all__ = ["PrepareBatchWithIdentifier"]


class PrepareBatchWithIdentifier(PrepareBatch):
    """Return ``(image, label, (), {"identifier": ids})`` when the batch has ``key``, else ``(image, label)``.

    MONAI's trainers and evaluators call ``inferer(image, network, *args, **kwargs)``, so the network receives
    ``identifier=ids`` (a ``(B,)`` long tensor; ``-1`` means "none"). Used by DALight-3D's identifier-conditioned
    normalisation.
    """

    def __init__(self, key: str = "identifier") -> None:
        self.key = key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if isinstance(batchdata, Mapping) and self.key in batchdata:
            ids = torch.as_tensor(batchdata[self.key]).long().reshape(-1).to(device=device, non_blocking=non_blocking)
            return image, label, (), {"identifier": ids}
        return image, label
