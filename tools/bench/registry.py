"""What is measured: the bundles and the baselines beside them.

``BASELINES`` names the MONAI baselines (and this project's EMCAD) and how to build each for a bundle's dimensions and
channels; ``BUNDLES`` is the registry of bundles with their default sizes and baselines; :func:`resolve_entry` turns
one registry entry into an :class:`Entry` (the bundle's network from its ``configs/inference.json``, its inferer's
roi size, overlap and blending, the baselines, the sizes after ``--scale``/``--roi``/``--volume``) or raises
:class:`SkipEntry`. No network is built here: an :class:`Entry` holds a :class:`ModelSpec` per model, whose
``build`` makes the network when a measurement needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from bench.common import ROOT, short

# --------------------------------------------------------------------------------------------------------------------
# MONAI baselines: name -> (factory(spatial_dims, in_channels, out_channels), description for the table)
# --------------------------------------------------------------------------------------------------------------------
_WIDTHS = (16, 32, 64, 128, 256)


def _unet(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=dims, in_channels=cin, out_channels=cout, channels=_WIDTHS, strides=(2, 2, 2, 2),
                num_res_units=2)


def _vnet(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import VNet

    return VNet(spatial_dims=dims, in_channels=cin, out_channels=cout)


def _attention_unet(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims=dims, in_channels=cin, out_channels=cout, channels=_WIDTHS, strides=(2, 2, 2, 2))


def _segresnet(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=dims, in_channels=cin, out_channels=cout, init_filters=16, blocks_down=(1, 2, 2, 4),
                     blocks_up=(1, 1, 1))


def _swin_unetr(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(spatial_dims=dims, in_channels=cin, out_channels=cout, feature_size=48)


def _unet_plusplus(dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import BasicUNetPlusPlus

    return BasicUNetPlusPlus(spatial_dims=dims, in_channels=cin, out_channels=cout)


def _emcad(variant: str) -> Callable[[int, int, int], nn.Module]:
    def build(dims: int, cin: int, cout: int) -> nn.Module:
        from medseg_nets.nets import EMCADNet

        if dims != 2:
            raise ValueError("EMCAD is a 2D network")
        return EMCADNet(in_channels=cin, out_channels=cout, encoder=f"pvt_v2_{variant}")

    return build


BASELINES: dict[str, tuple[Callable[[int, int, int], nn.Module], str]] = {
    "UNet": (_unet, "MONAI UNet, channels 16-256, strides 2, num_res_units 2"),
    "VNet": (_vnet, "MONAI VNet, defaults"),
    "AttentionUnet": (_attention_unet, "MONAI AttentionUnet, channels 16-256, strides 2"),
    "SegResNet": (_segresnet, "MONAI SegResNet, init_filters 16, blocks_down 1,2,2,4, blocks_up 1,1,1"),
    "SwinUNETR": (_swin_unetr, "MONAI SwinUNETR, feature_size 48"),
    "BasicUNetPlusPlus": (_unet_plusplus, "MONAI BasicUNetPlusPlus, defaults (features 32,32,64,128,256,32)"),
    # not MONAI's: this project's EMCAD network (bundles/emcad defaults), as the second point of comparison
    "EMCAD-B0": (_emcad("b0"), "medseg_nets EMCADNet, PVTv2-B0 encoder, kernels 1/3/5, 1x1 input adapter if C != 3"),
    "EMCAD-B2": (_emcad("b2"), "medseg_nets EMCADNet, PVTv2-B2 encoder, kernels 1/3/5, 1x1 input adapter if C != 3"),
}

# --------------------------------------------------------------------------------------------------------------------
# Bundle registry. Values here are the defaults used when the bundle's own configs do not say otherwise: when
# bundles/<name>/configs/inference.json exists, its network_def, in/out channels and inferer (roi size, overlap,
# blend mode, sw_batch_size, SliceInferer spatial_dim) win.
#   dims: spatial dims of the network; roi: patch size (network input); volume: (C, H, W, D) whole volume for the
#   sliding-window time, or None; slice_axis: for 2D networks on a 3D volume, the spatial dim SliceInferer slides
#   over; batches: batch sizes of the patch measurements (whole-volume time uses the inferer's sw_batch_size);
#   divisor: roi sizes are kept multiples of it, and at least it, when scaled (--scale; MONAI's UNet needs 32 in 3D
#   for its instance norm at the bottleneck); activation: how the bundle reads its logits ("softmax": argmax,
#   "sigmoid": each channel > 0), used by --sweep to count changed voxels; fallback: (medseg_nets.nets class, kwargs)
#   used with --fallback-nets while the bundle folder does not exist.
# --------------------------------------------------------------------------------------------------------------------
BUNDLES: dict[str, dict[str, Any]] = {
    "dalight3d": dict(
        activation="softmax",
        dims=3, in_channels=4, out_channels=4, roi=(64, 64, 64), volume=(4, 240, 240, 155), sw_batch_size=4,
        overlap=0.5, mode="gaussian", batches=(1,), divisor=32,
        baselines=["UNet", "VNet", "AttentionUnet", "SegResNet"],
        fallback=("DALight3D", dict(in_channels=4, out_channels=4)),
    ),
    "glims": dict(
        activation="sigmoid",
        dims=3, in_channels=4, out_channels=3, roi=(96, 96, 96), volume=(4, 240, 240, 155), sw_batch_size=4,
        overlap=0.5, mode="gaussian", batches=(1,), divisor=32,
        baselines=["SwinUNETR", "SegResNet"],
        fallback=("GLIMS", dict(in_channels=4, out_channels=3, feature_size=24)),
    ),
    "emcad": dict(
        activation="sigmoid",
        dims=2, in_channels=4, out_channels=3, roi=(224, 224), volume=(4, 240, 240, 155), slice_axis=2,
        sw_batch_size=16, overlap=0.5, mode="gaussian", batches=(1,), divisor=32,
        baselines=["EMCAD-B0", "UNet", "AttentionUnet"],
        fallback=("EMCADNet", dict(in_channels=4, out_channels=3, encoder="pvt_v2_b2")),
    ),
    "eamnet": dict(
        activation="sigmoid",
        dims=2, in_channels=3, out_channels=1, roi=(256, 256), volume=None, batches=(1, 8), divisor=16,
        baselines=["UNet", "AttentionUnet", "BasicUNetPlusPlus", "EMCAD-B0", "EMCAD-B2"],
        fallback=("EAMNet", dict(in_channels=3, out_channels=1)),
    ),
}


class FirstOutput(nn.Module):
    """Return the main output of networks that give a list/tuple (e.g. BasicUNetPlusPlus), for the inferers."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


@dataclass
class ModelSpec:
    name: str
    role: str  # "bundle" or "baseline"
    description: str
    build: Callable[[], nn.Module]


@dataclass
class Entry:
    bundle: str
    dims: int
    in_channels: int
    out_channels: int
    roi: tuple[int, ...]
    volume: Optional[tuple[int, ...]]
    sw_batch_size: int
    overlap: Any
    mode: str
    slice_axis: Optional[int]
    batches: tuple[int, ...]
    models: list[ModelSpec]
    source: str  # where the bundle network came from
    notes: list[str] = field(default_factory=list)


class SkipEntry(Exception):
    pass


def _scaled(size: Sequence[int], scale: float, divisor: int) -> tuple[int, ...]:
    return tuple(max(divisor, int(round(s * scale / divisor)) * divisor) for s in size)


def resolve_entry(name: str, fallback_nets: bool = False, baselines: Optional[Sequence[str]] = None,
                  scale: float = 1.0, roi_override: Optional[Sequence[int]] = None,
                  volume_override: Optional[Sequence[int]] = None) -> Entry:
    """Build the description of one registry entry: its bundle network, baselines and sizes (raises SkipEntry).

    Sizes: the bundle's (or the registry's) roi and volume, then ``scale`` (both), then the explicit overrides:
    ``roi_override`` (one int for every spatial dim, or one per dim) and ``volume_override`` (spatial sizes only).
    """
    if name not in BUNDLES:
        raise SkipEntry(f"unknown bundle {name!r}; known: {', '.join(BUNDLES)}")
    reg = BUNDLES[name]
    bundle_dir = ROOT / "bundles" / name
    config = bundle_dir / "configs" / "inference.json"
    dims, cin, cout = reg["dims"], reg["in_channels"], reg["out_channels"]
    roi, sw_batch, overlap, mode = tuple(reg["roi"]), reg.get("sw_batch_size", 1), reg.get("overlap", 0.5), \
        reg.get("mode", "gaussian")
    slice_axis = reg.get("slice_axis")
    notes: list[str] = []

    if config.is_file():
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle_dir)
        if "network_def" not in parser:
            raise SkipEntry(f"{config} has no network_def")
        for key in ("in_channels", "out_channels"):
            try:
                value = int(parser.get_parsed_content(f"network_def#{key}"))
            except Exception:  # the network may name them otherwise: keep the registry's value
                continue
            cin, cout = (value, cout) if key == "in_channels" else (cin, value)
        try:
            inferer = parser.get_parsed_content("inferer")
            if not hasattr(inferer, "roi_size"):  # e.g. SimpleInferer: whole images, patch size from the registry
                raise AttributeError(f"{type(inferer).__name__} has no roi_size")
            roi = tuple(int(r) for r in getattr(inferer, "orig_roi_size", inferer.roi_size))
            sw_batch, overlap = int(inferer.sw_batch_size), inferer.overlap
            if dims == 2 and len(roi) == 3 and -1 in roi:
                # a slice-wise network (e.g. EMCADNet(slice_axis=...)) behind windows holding every slice: the
                # same computation as SliceInferer over that axis, network_def#slice_batch slices at a time
                slice_axis = roi.index(-1)
                roi = tuple(r for i, r in enumerate(roi) if i != slice_axis)
                sw_batch = int(parser.get_parsed_content("network_def#slice_batch"))
                overlap = overlap[0] if isinstance(overlap, (list, tuple)) else overlap
            elif dims == 2 and len(roi) == 3 and 1 in roi:  # a 2D network behind a 3D window of depth 1
                slice_axis = roi.index(1)
                roi = tuple(r for i, r in enumerate(roi) if i != slice_axis)
            mode = getattr(inferer, "mode", mode)
            mode = str(getattr(mode, "value", mode))
            if hasattr(inferer, "spatial_dim"):
                slice_axis = int(inferer.spatial_dim)
        except Exception as e:  # noqa: BLE001 - report and use the registry's sizes
            notes.append(f"{name}: sizes from the registry, not the bundle's inferer ({short(e)})")

        def build_bundle_net(parser=parser) -> nn.Module:
            return parser.get_parsed_content("network_def", lazy=False)

        target = parser.get("network_def").get("_target_", "?")
        bundle_spec = ModelSpec(f"{target.rsplit('.', 1)[-1]} (bundle)", "bundle",
                                f"bundles/{name}/configs/inference.json network_def ({target})", build_bundle_net)
        source = str(config.relative_to(ROOT))
    else:
        fb = reg.get("fallback")
        if not fallback_nets or fb is None:
            raise SkipEntry(
                f"bundle folder bundles/{name} (configs/inference.json) not found"
                + ("; pass --fallback-nets to benchmark medseg_nets.nets." + fb[0] + " with documented defaults"
                   if fb else "")
            )
        cls_name, kwargs = fb
        cls = getattr(importlib.import_module("medseg_nets.nets"), cls_name)
        cin, cout = kwargs.get("in_channels", cin), kwargs.get("out_channels", cout)
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        bundle_spec = ModelSpec(f"{cls_name} (no bundle yet)", "bundle",
                                f"medseg_nets.nets.{cls_name}({args}) - no bundle folder yet, documented defaults",
                                lambda cls=cls, kwargs=kwargs: cls(**kwargs))
        source = f"medseg_nets.nets.{cls_name}({args})"
        notes.append(f"{name}: bundles/{name} does not exist yet; network instantiated directly: {source}")

    if scale != 1.0:
        roi = _scaled(roi, scale, reg.get("divisor", 16))
    if roi_override:
        roi = tuple(int(r) for r in roi_override)
        roi = roi * dims if len(roi) == 1 else roi
        if len(roi) != dims:
            raise SkipEntry(f"--roi {roi_override} does not fit a {dims}D network")
    volume = reg.get("volume")
    if volume is not None:
        volume = tuple(volume)
        if scale != 1.0:
            axis = 2 if slice_axis is None else slice_axis
            vroi = roi if len(roi) == 3 else tuple(roi[:axis]) + (1,) + tuple(roi[axis:])
            volume = (volume[0],) + tuple(max(int(round(v * scale)), r) for v, r in zip(volume[1:], vroi))
        if volume_override:
            if len(volume_override) != len(volume) - 1:
                raise SkipEntry(f"--volume {volume_override} does not fit the {len(volume) - 1}D volume of {name}")
            volume = (volume[0],) + tuple(int(v) for v in volume_override)
        if volume[0] != cin:
            notes.append(f"{name}: volume has {volume[0]} channels, network {cin}: volume channels set to {cin}")
            volume = (cin,) + volume[1:]

    models = [bundle_spec]
    wanted = reg["baselines"] if baselines is None else [b for b in reg["baselines"] if b in baselines]
    for b in wanted:
        factory, desc = BASELINES[b]
        models.append(ModelSpec(b, "baseline", desc, lambda f=factory, d=dims, i=cin, o=cout: f(d, i, o)))
    return Entry(name, dims, cin, cout, roi, volume, sw_batch, overlap, mode, slice_axis,
                 tuple(reg.get("batches", (1,))), models, source, notes)
