"""Datasets that wait for the run before reading data (so that a workflow can be built and inspected without it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.data import CacheDataset as _MonaiCacheDataset

from medseg_nets.data.inputs import LazyDatalist

__all__ = ["CacheDataset"]


class CacheDataset(_MonaiCacheDataset):
    """MONAI's ``CacheDataset`` that, given a :class:`~medseg_nets.data.LazyDatalist`, fills its cache when the
    run has started (:meth:`~medseg_nets.data.Datalists.start`) rather than when it is created: building a workflow
    to inspect it (``create_workflow`` + ``check_properties()``) then reads no image. Any other ``data`` (e.g. a
    list set by MONAI Label) is cached at once, as MONAI does."""

    def set_data(self, data: Sequence) -> None:
        if isinstance(data, LazyDatalist) and not data.owner.started:
            self.data = data
            self._deferred = True
            self.cache_num, self._cache, self._hash_keys = 0, [], []
            return
        self._deferred = False
        super().set_data(data)

    def _ensure_cache(self) -> None:
        if getattr(self, "_deferred", False) and self.data.owner.started:
            self.set_data(self.data)

    def __len__(self) -> int:
        self._ensure_cache()
        return super().__len__()

    def _transform(self, index: int) -> Any:
        self._ensure_cache()
        return super()._transform(index)
