"""Input checks that turn bad data into an :class:`~medseg_nets.errors.InputDataError` naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from medseg_nets.errors import InputDataError

__all__ = ["source_name", "LoadImageCheckedd", "CheckSegmentationInputd", "EnsureIdentifierd"]


def source_name(data: Any, default: str = "<in-memory image>") -> str:
    """The file an image was read from (``meta['filename_or_obj']`` of a MetaTensor), or ``default``."""
    meta = getattr(data, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if isinstance(name, (list, tuple)):
            name = name[0] if len(name) else None
        if name:
            return str(name)
    return default


class LoadImageCheckedd(LoadImaged):
    """MONAI's ``LoadImaged`` (``image_only=True``) whose read errors name the file that failed.

    A truncated ``.nii.gz`` or an unreadable file raises :class:`InputDataError`
    ``"<path>: cannot be read (<reason>); expected a complete <expected> file"`` instead of a bare ``EOFError``.
    """

    def __init__(self, keys: KeysCollection, *args: Any, expected: str = "image", **kwargs: Any) -> None:
        kwargs["image_only"] = True
        super().__init__(keys, *args, **kwargs)
        self.expected = expected

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            src = d[key]
            try:
                loaded = self._loader(src, reader)
            except Exception as e:  # nibabel/itk/PIL raise many different types
                raise InputDataError(
                    f"{src}: cannot be read ({type(e).__name__}: {e}); expected a complete, readable {self.expected} file"
                ) from e
            if self._loader.image_only:
                d[key] = loaded
            else:  # MONAI Label's BundleInferTask switches image_only off: (image, meta dict) as LoadImaged stores them
                d[key] = loaded[0]
                d[meta_key or f"{key}_{meta_key_postfix}"] = loaded[1]
        return d


class CheckSegmentationInputd(MapTransform):
    """Check a channel-first image (and optionally its label map) before any other processing.

    Raises :class:`InputDataError` naming the file when:

    - the image does not have ``num_channels`` channels (message lists ``channel_names``);
    - the image has NaN or infinite voxels (``check_finite``);
    - the image is zero everywhere (``check_nonzero``: nothing to crop to or sample from; MONAI would stop much
      later with "No sampling location available" and no file named);
    - the label's spatial shape differs from the image's, or it has more than one channel;
    - the label has values outside ``label_values``.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        num_channels: int | None = None,
        channel_names: Sequence[str] | None = None,
        label_values: Sequence[int] | None = None,
        check_finite: bool = True,
        allow_missing_keys: bool = True,
        check_nonzero: bool = True,
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key
        self.num_channels = num_channels
        self.channel_names = list(channel_names) if channel_names else None
        self.label_values = sorted(int(v) for v in label_values) if label_values is not None else None
        self.check_finite = check_finite
        self.check_nonzero = check_nonzero

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        image = data[self.image_key]
        name = source_name(image)
        if self.num_channels is not None and image.shape[0] != self.num_channels:
            names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
            raise InputDataError(
                f"{name}: has {image.shape[0]} channel(s) (channel-first shape {tuple(image.shape)}), "
                f"expected {self.num_channels}{names}"
            )
        if self.check_finite and torch.is_floating_point(torch.as_tensor(image)):
            bad = int((~torch.isfinite(torch.as_tensor(image))).sum())
            if bad:
                raise InputDataError(f"{name}: contains {bad} NaN/infinite voxel(s); expected finite intensities")
        if self.check_nonzero and not bool(torch.as_tensor(image).any()):
            raise InputDataError(
                f"{name}: every voxel is 0 (shape {tuple(image.shape)}); expected an image with signal (an empty or "
                "blank export?)"
            )
        if self.label_key and self.label_key in data:
            label = data[self.label_key]
            lname = source_name(label)
            if label.shape[0] != 1 or tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise InputDataError(
                    f"{lname}: label shape {tuple(label.shape)} does not match image {name} "
                    f"{tuple(image.shape)}; expected one channel with spatial shape {tuple(image.shape[1:])}"
                )
            if self.label_values is not None:
                lab = torch.as_tensor(label)
                if torch.is_floating_point(lab) and not torch.isfinite(lab).all():
                    raise InputDataError(f"{lname}: label contains NaN/infinite values; expected {self.label_values}")
                found = [float(v) for v in torch.unique(lab).tolist()]  # labels are often loaded as float32
                bad = [v for v in found if not v.is_integer() or int(v) not in self.label_values]
                unknown = sorted({int(v) if v.is_integer() else v for v in bad})
                if unknown:
                    raise InputDataError(
                        f"{lname}: label values {unknown} are not among the expected {self.label_values}"
                    )
        return data


class EnsureIdentifierd(MapTransform):
    """Give every item an integer ``identifier`` (e.g. site or scanner, used by DALight-3D's ICN).

    Items without one get ``default`` (``-1`` = "no identifier"), so that a batch always collates to a ``(B,)``
    ``torch.long`` tensor.
    """

    def __init__(self, key: str = "identifier", default: int = -1) -> None:
        super().__init__([key], allow_missing_keys=True)
        self.key = key
        self.default = int(default)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        value = d.get(self.key, self.default)
        if value is None:
            value = self.default
        try:
            value = int(value)
        except (TypeError, ValueError) as e:
            raise InputDataError(f"{self.key}={value!r} for {d.get('image', '<item>')}: expected an integer") from e
        d[self.key] = torch.tensor(value, dtype=torch.long)
        return d
