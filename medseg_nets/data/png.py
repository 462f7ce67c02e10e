"""A PNG writer for binary 2D masks (MONAI ``SaveImage(d)`` writer API): 0/255, atomic, optional overlay image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageWriter
from monai.utils import convert_data_type
from PIL import Image

from medseg_nets.utils import as_bool
from medseg_nets.utils.fileio import atomic_write, provisional

# PIL transpose that undoes ImageOps.exif_transpose for each EXIF orientation (2-8)
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}

__all__ = ["PNGMaskWriter", "overlay_mask"]


def overlay_mask(
    rgb: np.ndarray, mask: np.ndarray, colour: Sequence[int] = (0, 255, 0), alpha: float = 0.35
) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with the mask (H, W) tinted by ``colour`` and its outline drawn in full colour."""
    m = mask.astype(bool)
    out = rgb.astype(np.float32)
    col = np.asarray(colour, dtype=np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * col
    inner = m.copy()  # 4-neighbour erosion: the outline is the mask minus its interior
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out[m & ~inner] = col
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class PNGMaskWriter(ImageWriter):
    """Write a one-channel binary mask as an 8-bit grey PNG with values 0 and 255, atomically.

    For ``SaveImage(d)`` (``output_ext=".png"``): ``SaveImaged(..., writer="medseg_nets.data.PNGMaskWriter")``, or
    with options from a bundle config ``{"_target_": "medseg_nets.data.PNGMaskWriter", "_mode_": "callable",
    "save_overlay": true}``. Pixels ``> threshold`` are lesion (255). The array is expected in MONAI's PIL axis
    convention (``PILReader(reverse_indexing=True)``, spatial axes width, height) and written back in PIL's
    (height, width), so the PNG has the size of the image it was predicted from; when the metadata names the
    source image file (``filename_or_obj``) and its size differs from the mask's, writing fails instead of
    producing a misaligned mask. A source photo with an EXIF orientation was read turned as viewers show it
    (:func:`medseg_nets.data.rgb_image`): the mask is turned back to the photo's stored pixel order and written with
    the same orientation tag, so that it lies on the stored pixels and viewers show it turned as the photo.

    ``save_overlay``: also write ``<source stem>_overlay.png`` next to the mask: the source image with the lesion
    tinted and outlined in ``overlay_colour``.
    """

    def __init__(
        self,
        output_dtype: Any = np.uint8,
        scale: int | None = None,
        save_overlay: bool | str = False,
        threshold: float = 0.5,
        reverse_indexing: bool = True,
        overlay_colour: Sequence[int] = (0, 255, 0),
        overlay_alpha: float = 0.35,
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dtype=output_dtype, scale=scale, **kwargs)
        self.save_overlay = as_bool(save_overlay)
        self.threshold = float(threshold)
        self.reverse_indexing = reverse_indexing
        self.overlay_colour = tuple(int(c) for c in overlay_colour)
        self.overlay_alpha = float(overlay_alpha)
        self.source: str | None = None

    def set_data_array(
        self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs: Any
    ) -> None:
        data = convert_data_type(data_array, np.ndarray)[0] if isinstance(data_array, torch.Tensor) else np.asarray(data_array)
        if channel_dim is not None:
            data = np.moveaxis(data, channel_dim, 0)
            if data.shape[0] != 1:
                raise ValueError(f"PNGMaskWriter writes one-channel masks, got {data.shape[0]} channels")
            data = data[0]
        while data.ndim > 2 and squeeze_end_dims and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 2:
            raise ValueError(f"PNGMaskWriter writes 2D masks, got spatial shape {data.shape}")
        self.data_obj = data

    def set_metadata(self, meta_dict: Mapping | None = None, **options: Any) -> None:
        src = meta_dict.get("filename_or_obj") if meta_dict else None
        if isinstance(src, (list, tuple)):
            src = src[0] if src else None
        self.source = str(src) if src and Path(str(src)).is_file() else None

    def mask(self) -> np.ndarray:
        """The mask as written: (height, width) uint8, 0 or 255."""
        data = np.asarray(self.data_obj)
        if self.reverse_indexing:
            data = data.T
        return np.where(data > self.threshold, 255, 0).astype(np.uint8)

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        from medseg_nets.data.skin import exif_orientation

        mask = self.mask()
        rgb = None
        save_kwargs: dict[str, Any] = {}
        if self.source is not None:
            with Image.open(self.source) as src:
                orientation = exif_orientation(src)
                if orientation != 1:
                    mask = np.asarray(Image.fromarray(mask).transpose(_UNDO_ORIENTATION[orientation]))
                    exif = Image.Exif()
                    exif[0x0112] = orientation
                    save_kwargs["exif"] = exif
                if src.size != (mask.shape[1], mask.shape[0]):
                    raise ValueError(
                        f"mask {mask.shape[1]}x{mask.shape[0]} for {filename} does not have the size of its source "
                        f"image {self.source} {src.size[0]}x{src.size[1]} (width x height)"
                    )
                if self.save_overlay:
                    rgb = np.asarray(src.convert("RGB"))
        path = Path(filename)
        provisional(path)
        atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG", **save_kwargs))
        if self.save_overlay:
            if rgb is None:
                raise ValueError(f"save_overlay: the source image of {filename} is unknown (no filename_or_obj)")
            over = overlay_mask(rgb, mask > 0, self.overlay_colour, self.overlay_alpha)
            stem = Path(self.source).stem if self.source else path.stem
            provisional(path.with_name(f"{stem}_overlay.png"))
            atomic_write(
                path.with_name(f"{stem}_overlay.png"),
                lambda tmp: Image.fromarray(over).save(tmp, format="PNG", **save_kwargs),
            )
