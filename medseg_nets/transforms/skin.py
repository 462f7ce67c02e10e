"""Colour augmentation for RGB (dermoscopy) images, which MONAI does not provide."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandColorJitterd", "color_jitter"]

# ITU-R BT.601 luma and the YIQ transform (rows: Y, I, Q)
_LUMA = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(3, *([1] * (x.ndim - 1)))
    return (x * w).sum(0, keepdim=True)


def color_jitter(
    x: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0, hue: float = 0.0
) -> torch.Tensor:
    """Jitter a channel-first RGB tensor with values in [0, 1], in this order:

    - brightness: ``x * brightness``;
    - contrast: blend with the mean grey level, ``m + contrast * (x - m)``;
    - saturation: blend with the pixel's grey level, ``g + saturation * (x - g)``;
    - hue: rotate the chroma by ``hue`` turns (``hue`` in [-0.5, 0.5]) in YIQ space (a linear approximation of an
      HSV hue shift that keeps the luma);

    then clip to [0, 1]. Factors of 1 (hue 0) leave the image unchanged.
    """
    if x.shape[0] != 3:
        raise ValueError(f"color_jitter expects 3 channels (RGB) first, got shape {tuple(x.shape)}")
    out = x * brightness
    if contrast != 1.0:
        m = _grey(out).mean()
        out = m + contrast * (out - m)
    if saturation != 1.0:
        g = _grey(out)
        out = g + saturation * (out - g)
    if hue != 0.0:
        fwd = torch.tensor(_RGB2YIQ, dtype=torch.float64)
        theta = torch.tensor(2.0 * torch.pi * hue, dtype=torch.float64)
        c, s = torch.cos(theta), torch.sin(theta)
        rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
        rot[1, 1], rot[1, 2], rot[2, 1], rot[2, 2] = c, -s, s, c
        mat = (torch.linalg.inv(fwd) @ rot @ fwd).to(dtype=out.dtype, device=out.device)
        out = torch.einsum("ij,j...->i...", mat, out)
    return out.clamp(0.0, 1.0)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """With probability ``prob``, :func:`color_jitter` the RGB images of ``keys`` with factors drawn uniformly:
    brightness and contrast and saturation in ``[1 - b, 1 + b]`` etc., hue in ``[-hue, hue]`` turns.

    The same factors are used for every key of one item. Expects channel-first RGB in [0, 1] (scale first).
    """

    backend = [torch.Tensor.__name__]

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.05,
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.ranges = (float(brightness), float(contrast), float(saturation))
        self.hue = float(hue)
        self.factors = (1.0, 1.0, 1.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        b, c, s = (float(self.R.uniform(1.0 - r, 1.0 + r)) for r in self.ranges)
        self.factors = (b, c, s, float(self.R.uniform(-self.hue, self.hue)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = color_jitter(torch.as_tensor(d[key]), *self.factors)
        return d
