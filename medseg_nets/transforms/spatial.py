"""MONAI's ``Spacingd`` made safe for the extra keys MONAI Label puts in the data dict."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd as _MonaiSpacingd

__all__ = ["Spacingd"]


class Spacingd(_MonaiSpacingd):
    """``monai.transforms.Spacingd`` that leaves non-dict ``<key>_*`` entries alone (same arguments, same inverse).

    Since MONAI 1.6, ``Spacingd.__call__`` treats every data-dict key that starts with ``"<key>_"`` as a metadata dict
    of ``<key>`` and calls ``.update(...)`` on it when the image came from a NIfTI file
    (``monai/transforms/spatial/dictionary.py``, ``meta_keys = [k for k in d.keys() ... k.startswith(f"{key}_")]``).
    MONAI Label's ``BasicInferTask`` adds ``image_path`` (a ``str``) to every request's data dict, so with MONAI 1.6
    every NIfTI inference failed with ``AttributeError: 'str' object has no attribute 'update'``. This subclass hides
    the ``<key>_*`` entries that are not mappings during MONAI's call and puts them back unchanged afterwards; with
    MONAI 1.5 (no such update) it behaves exactly as MONAI's.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{k}_" for k in self.keys)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], Mapping)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
