"""Label-map conversions shared by the bundles."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["labels_to_channels", "LabelsToChannelsd"]


def labels_to_channels(label: torch.Tensor, channels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Turn a one-channel label map into binary channels; channel ``i`` is 1 where the label is in ``channels[i]``.

    ``channels=[[1, 2, 3], [2, 3], [3]]`` gives the BraTS regions WT, TC, ET of MSD Task01 labels;
    ``[[1], [2], [3]]`` gives one channel per label. The input must have shape ``(1, *spatial)``.
    """
    if label.shape[0] != 1:
        raise ValueError(f"expected a one-channel label map, got shape {tuple(label.shape)}")
    out = [torch.isin(label[0], torch.as_tensor(list(c), device=label.device, dtype=label.dtype)) for c in channels]
    result = torch.stack(out).to(torch.float32)
    if hasattr(label, "meta"):  # keep MetaTensor metadata (affine, filename) for savers and metrics reports
        result = label.__class__(result, meta=label.meta, applied_operations=label.applied_operations)
    return result


class LabelsToChannelsd(MapTransform):
    """Dictionary version of :func:`labels_to_channels`, writing the result to ``output_keys`` (default: in place)."""

    def __init__(
        self,
        keys: KeysCollection,
        channels: Sequence[Sequence[int]],
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = [list(c) for c in channels]
        self.output_keys = list(output_keys) if output_keys is not None else list(self.keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError("output_keys must have one entry per key")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in zip(self.keys, self.output_keys):
            if key in d:
                d[out_key] = labels_to_channels(torch.as_tensor(d[key]) if not hasattr(d[key], "meta") else d[key], self.channels)
            elif not self.allow_missing_keys:
                raise KeyError(key)
        return d
