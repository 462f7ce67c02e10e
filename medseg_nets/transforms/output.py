"""The last step of every bundle's inference postprocessing: the label map as it is written."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import get_equivalent_dtype

__all__ = ["AsLabelMapd"]


class AsLabelMapd(MapTransform):
    """Cast the label map to an integer type and, for 2D bundles, drop its channel.

    Every bundle's ``postprocessing`` ends with this transform (after its ``SaveImaged``, which keeps the channel
    its writers expect), so that whoever takes the output of the chain gets the label map as written. MONAI Label
    does: it drops ``SaveImaged``, appends its ``Restored`` and writes the result with its own writer, which keeps
    the array's dtype (no dtype reached it before: float32 label files) and removes the channel of 3D maps only
    (a 2D ``(1, W, H)`` mask reached its JPEG/PNG writer as a 3D image).

    Args:
        keys: the label map(s), channel first (one channel).
        dtype: integer dtype of the result (``"uint8"``: labels up to 255).
        squeeze_channel: drop the channel (2D bundles: the array becomes ``(W, H)`` in MONAI's PIL axis order).
        result_extension: file type MONAI Label's writer uses when the request names none (``result_extension``
            absent from the data dict); ``None`` leaves MONAI Label's default, the input's extension.
    """

    def __init__(
        self,
        keys: KeysCollection,
        dtype: Any = "uint8",
        squeeze_channel: bool = False,
        result_extension: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.integer):
            raise ValueError(f"AsLabelMapd: dtype must be an integer type, got {self.dtype}")
        self.squeeze_channel = squeeze_channel
        self.result_extension = result_extension

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if self.squeeze_channel:
                if x.shape[0] != 1:
                    raise ValueError(f"AsLabelMapd: {key} has {x.shape[0]} channels, expected one to drop")
                x = x[0]
            if torch.is_tensor(x):  # a MetaTensor stays one (metadata kept)
                x = (x.round() if x.is_floating_point() else x).to(get_equivalent_dtype(self.dtype, torch.Tensor))
            else:
                x = np.asarray(x)
                x = (np.rint(x) if np.issubdtype(x.dtype, np.floating) else x).astype(self.dtype)
            d[key] = x
        if self.result_extension and not d.get("result_extension"):
            d["result_extension"] = self.result_extension
        return d
