"""Image writers for MONAI's ``SaveImage(d)``: atomic, and faithful to the input file's NIfTI header."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelWriter
from monai.data.utils import to_affine_nd
from monai.utils import convert_data_type

from medseg_nets.utils.fileio import atomic_write, provisional

__all__ = ["NiftiLikeInputWriter"]


class NiftiLikeInputWriter(NibabelWriter):
    """A ``NibabelWriter`` that writes atomically and reuses the header of the image the prediction came from.

    Use it as ``SaveImaged(..., writer="medseg_nets.data.NiftiLikeInputWriter")``. When the metadata names a NIfTI
    source file (``filename_or_obj``) whose spatial shape equals the output's and whose affine matches the output
    affine (after ``Invertd``), the source header is copied (qform/sform codes, units, description, intent cleared)
    and the source affine is written bit-for-bit; otherwise it behaves as ``NibabelWriter``. The file appears
    under its final name only once completely written, so an interrupted run leaves no truncated prediction.
    """

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        self._source = None
        if meta_dict is not None:
            src = meta_dict.get("filename_or_obj")
            if isinstance(src, (list, tuple)):
                src = src[0] if src else None
            if src and str(src).endswith((".nii", ".nii.gz")) and Path(str(src)).is_file():
                self._source = str(src)
        super().set_metadata(meta_dict, resample=resample, **options)

    def resample_if_needed(
        self,
        data_array: Any,
        affine: Any = None,
        target_affine: Any = None,
        output_spatial_shape: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """With ``resample=False`` (no target affine, no output shape) return the data and its affine untouched.

        MONAI 1.6.1 still runs a no-op ``SpatialResample`` there, which takes the channel-last 3D array for a
        channel-first 2D one and truncates the affine to its top-left 2x2 block: for a volume stored with permuted
        axes (e.g. sagittal first) that block is singular and saving fails with "Affine ... is not invertible".
        """
        if target_affine is None and output_spatial_shape is None:
            return data_array, affine
        return super().resample_if_needed(data_array, affine, target_affine, output_spatial_shape, **kwargs)

    def _source_header(self, shape: tuple[int, ...]) -> tuple[np.ndarray, nib.Nifti1Header] | None:
        if self._source is None or self.affine is None:
            return None
        try:
            src = nib.load(self._source)
        except Exception:
            return None
        src_affine = src.affine
        affine = to_affine_nd(r=3, affine=convert_data_type(self.affine, np.ndarray)[0])
        if tuple(src.shape[:3]) != tuple(shape[:3]) or not np.allclose(src_affine, affine, atol=1e-3):
            return None
        header = src.header.copy()
        return src_affine, header

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        provisional(filename)  # removed again if the run stops on bad input
        data = np.asarray(convert_data_type(self.data_obj, np.ndarray)[0])
        like = self._source_header(tuple(data.shape))
        if like is None:
            atomic_write(filename, lambda tmp: NibabelWriter.write(self, tmp, verbose=verbose, **obj_kwargs))
            return
        _, header = like
        if self.output_dtype is not None:
            data = data.astype(self.output_dtype, copy=False)
        header.set_data_dtype(data.dtype)
        header.set_data_shape(data.shape)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        header["intent_code"] = 0
        img = nib.Nifti1Image(data, None, header=header)  # affine=None keeps the source's qform/sform and their codes
        atomic_write(filename, lambda tmp: nib.save(img, tmp))
