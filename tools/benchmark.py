#!/usr/bin/env python
"""Benchmark a bundle's network against MONAI baselines, in the same run, and report ratios.

For each bundle in ``BUNDLES`` the bundle's real network is instantiated from its ``configs/inference.json``
(``network_def``, through ``monai.bundle.ConfigParser``) and compared with MONAI baselines that have the same input
and output channels. Per model (and per batch size) it measures:

- parameters (all of them, trainable or not);
- GFLOPs of one forward at the bundle's patch size, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (a multiply-add counts as 2 FLOPs; norms, activations and element-wise ops are not counted);
- forward latency: median over ``--repeats`` forwards under ``torch.inference_mode`` after warm-up;
- peak forward memory above the model and its input. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the forward. CPU: growth of the resident set during one forward in a *fresh* Python process
  (Linux ``VmHWM - VmRSS``, the high-water mark reset through ``/proc/self/clear_refs`` just before the forward),
  which includes allocator and oneDNN workspace overheads and is not comparable with the CUDA figure;
- whole-volume time on a random 4 x 240 x 240 x 155 volume with ``monai.inferers.SlidingWindowInferer`` (3D networks)
  or ``monai.inferers.SliceInferer`` (2D networks run slice by slice), using the bundle's roi size, overlap, blend
  mode and ``sw_batch_size``; run once by default (``--volume-repeats``);
- ratios baseline / bundle network for each figure (> 1: the baseline is bigger or slower).

Output: a Markdown table (stdout and ``--out``) whose header gives the date, machine, versions and the exact
command; optionally a JSON file with every raw figure (``--json``).

Usage:
    python tools/benchmark.py --bundle dalight3d                       # CPU or CUDA, picked automatically
    python tools/benchmark.py --bundle dalight3d --device cuda --amp --repeats 20 --out bench.md --json bench.json
    python tools/benchmark.py --all --fallback-nets                    # every entry, one table
    python tools/benchmark.py --bundle dalight3d --scale 0.25 --repeats 1 --skip-volume   # a quick tiny run
    python tools/benchmark.py --bundle glims --profile                 # time by kind of layer and by operator
    python tools/benchmark.py --bundle glims --keep-freed-memory       # CPU allocator as the bundles' configs set it

CPU is slow: with 2 cores a 64^3 sliding window over 240x240x155 (196 windows) takes minutes per model. Use
``--skip-volume`` to leave the whole-volume column out, ``--baselines`` to run a subset, and ``--threads`` to fix
the number of intra-op threads (``torch.set_num_threads``).

Adding a bundle: add an entry to ``BUNDLES`` (and, if it needs one, a baseline factory to ``BASELINES``). An entry
whose ``bundles/<name>`` folder does not exist yet is skipped with a message; with ``--fallback-nets`` its network is
instantiated directly from ``medseg_nets.nets`` with the documented defaults of the entry's ``fallback`` instead
(the table then says so).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from medseg_nets.blocks.depthwise import set_cpu_fast_path
from medseg_nets.utils import keep_freed_memory, malloc_trim

ROOT = Path(__file__).resolve().parents[1]

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
    # not MONAI's: this project's EMCAD network (bundles/emcad defaults), as the issue's second point of comparison
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


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def _short(e: BaseException, limit: int = 300) -> str:
    """First line of an exception message, shortened (MONAI's optional-import errors carry whole tracebacks)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return (text[:limit] + "...") if len(text) > limit else text


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
            if dims == 2 and len(roi) == 3 and 1 in roi:  # a 2D network behind a 3D window of depth 1
                slice_axis = roi.index(1)
                roi = tuple(r for i, r in enumerate(roi) if i != slice_axis)
            sw_batch, overlap = int(inferer.sw_batch_size), inferer.overlap
            mode = getattr(inferer, "mode", mode)
            mode = str(getattr(mode, "value", mode))
            if hasattr(inferer, "spatial_dim"):
                slice_axis = int(inferer.spatial_dim)
        except Exception as e:  # noqa: BLE001 - report and use the registry's sizes
            notes.append(f"{name}: sizes from the registry, not the bundle's inferer ({_short(e)})")

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


# --------------------------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def cpu_forward_peak_rss_mib(model: nn.Module, shape: Sequence[int], amp: bool = False) -> float:
    """Peak resident-set growth (MiB) during one forward of ``model`` on a random input of ``shape`` (Linux only).

    The model and input exist before the high-water mark is reset (``/proc/self/clear_refs``), so their memory is
    excluded. Honest only in a process that has done nothing else (freed memory kept by the allocator would be
    reused without growing the resident set): the benchmark calls it in a fresh subprocess per model.
    """
    x = torch.randn(*shape)
    device = torch.device("cpu")
    malloc_trim()  # give freed heap memory back to the OS, so that reusing it shows as growth again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _proc_status_kib("VmRSS")
    with torch.inference_mode(), _autocast(device, amp):
        out = model(x)
    peak = _proc_status_kib("VmHWM")
    del out
    return (peak - before) / 1024.0


def _memory_worker(spec_json: str) -> None:
    """Entry point of the fresh subprocess that measures one model's CPU forward memory; prints one JSON line."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    entry = resolve_entry(spec["bundle"], spec["fallback_nets"], [spec["model"]])
    model = FirstOutput(next(m for m in entry.models if m.name == spec["model"]).build()).eval()
    set_cpu_fast_path(model, not spec.get("plain_depthwise", False))
    mib = cpu_forward_peak_rss_mib(model, spec["shape"], spec["amp"])
    print("MEMORY_RESULT " + json.dumps({"peak_mib": mib}), flush=True)


def _cpu_memory_subprocess(spec: dict[str, Any], timeout: float = 3600) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return float(json.loads(line[len("MEMORY_RESULT "):])["peak_mib"])
    raise RuntimeError(f"memory subprocess failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


def _inferer(entry: Entry, device: torch.device):
    from monai.inferers import SliceInferer, SlidingWindowInferer

    kwargs = dict(roi_size=entry.roi, sw_batch_size=entry.sw_batch_size, overlap=entry.overlap, mode=entry.mode,
                  sw_device=device, device=device)
    if entry.dims == 2 and entry.volume is not None and len(entry.volume) == 4:
        return SliceInferer(spatial_dim=entry.slice_axis if entry.slice_axis is not None else 2, **kwargs)
    return SlidingWindowInferer(**kwargs)


def measure_model(entry: Entry, spec: ModelSpec, device: torch.device, opts: argparse.Namespace) -> list[dict]:
    """All measurements of one model of ``entry``: one result dict per batch size."""
    torch.manual_seed(0)
    model = FirstOutput(spec.build()).eval()
    set_cpu_fast_path(model, not opts.plain_depthwise)
    params = sum(p.numel() for p in model.parameters())
    model = model.to(device)
    results = []
    for b_idx, batch in enumerate(entry.batches):
        shape = (batch, entry.in_channels) + tuple(entry.roi)
        res: dict[str, Any] = dict(bundle=entry.bundle, model=spec.name, role=spec.role, description=spec.description,
                                   batch=batch, input_shape=list(shape), params=params, gflops=None, latency_ms=None,
                                   latencies_ms=[], peak_mem_mib=None, volume_s=None, volume_times_s=[], errors=[])
        results.append(res)
        try:
            from torch.utils.flop_counter import FlopCounterMode

            x = torch.randn(*shape, device=device)
            with torch.inference_mode(), _autocast(device, opts.amp):
                counter = FlopCounterMode(display=False)
                with counter:  # the counted pass doubles as the first warm-up
                    model(x)
                res["gflops"] = counter.get_total_flops() / 1e9
                for _ in range(opts.warmup):
                    model(x)
                _sync(device)
                times = []
                for _ in range(opts.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    times.append((time.perf_counter() - t0) * 1000.0)
            res["latencies_ms"] = times
            res["latency_ms"] = statistics.median(times)
            log(f"  {spec.name} batch {batch}: {params:,} params, {res['gflops']:.2f} GFLOPs, "
                f"median {res['latency_ms']:.1f} ms")
        except Exception as e:  # noqa: BLE001 - report the failure in the table, go on with the others
            res["errors"].append(f"forward: {type(e).__name__}: {_short(e)}")
            log(f"  {spec.name} batch {batch}: forward failed: {_short(e)}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue

        if opts.memory != "none":
            try:
                if device.type == "cuda":
                    del x
                    torch.cuda.empty_cache()
                    x = torch.randn(*shape, device=device)
                    _sync(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    with torch.inference_mode(), _autocast(device, opts.amp):
                        out = model(x)
                    _sync(device)
                    res["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    del out
                elif opts.memory == "inprocess":
                    res["peak_mem_mib"] = cpu_forward_peak_rss_mib(model, shape, opts.amp)
                else:
                    res["peak_mem_mib"] = _cpu_memory_subprocess(dict(
                        bundle=entry.bundle, model=spec.name, fallback_nets=opts.fallback_nets, shape=list(shape),
                        amp=opts.amp, threads=torch.get_num_threads(),
                        plain_depthwise=opts.plain_depthwise))
                log(f"  {spec.name} batch {batch}: peak forward memory {res['peak_mem_mib']:.0f} MiB")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"memory: {type(e).__name__}: {_short(e)}")
                log(f"  {spec.name} batch {batch}: memory measurement failed: {_short(e)}")
        del x

        if b_idx == 0 and entry.volume is not None and not opts.skip_volume:
            try:
                inferer = _inferer(entry, device)
                gen = torch.Generator().manual_seed(0)
                vol = torch.randn(1, *entry.volume, generator=gen).to(device)
                times = []
                with torch.inference_mode(), _autocast(device, opts.amp):
                    for _ in range(opts.volume_repeats):
                        _sync(device)
                        t0 = time.perf_counter()
                        out = inferer(vol, model)
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                        del out
                res["volume_times_s"] = times
                res["volume_s"] = statistics.median(times)
                log(f"  {spec.name}: whole volume {tuple(entry.volume)} in {res['volume_s']:.1f} s")
                del vol
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"volume: {type(e).__name__}: {_short(e)}")
                log(f"  {spec.name}: whole-volume run failed: {_short(e)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def add_ratios(results: list[dict]) -> None:
    """ratio_<metric> = baseline / bundle network, per bundle and batch size (the bundle network's row is 1)."""
    metrics = ("params", "gflops", "latency_ms", "peak_mem_mib", "volume_s")
    refs = {(r["bundle"], r["batch"]): r for r in results if r["role"] == "bundle"}
    for r in results:
        ref = refs.get((r["bundle"], r["batch"]))
        for m in metrics:
            ok = ref is not None and r[m] is not None and ref[m] not in (None, 0)
            r[f"ratio_{m}"] = r[m] / ref[m] if ok else None


# --------------------------------------------------------------------------------------------------------------------
# inference-speed sweep of a bundle's own network (--sweep)
# --------------------------------------------------------------------------------------------------------------------
class ChannelsLast(nn.Module):
    """Feed the wrapped network channels-last inputs (``torch.channels_last``/``channels_last_3d``); its weights are
    converted once at construction. The numbers are those of the contiguous network up to float rounding."""

    def __init__(self, net: nn.Module, dims: int) -> None:
        super().__init__()
        self.fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        self.net = net.to(memory_format=self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=self.fmt))


def _labels(logits: torch.Tensor, activation: str) -> torch.Tensor:
    return logits.argmax(1) if activation == "softmax" else logits > 0


def sweep_variants(entry: Entry, device: torch.device, amp_allowed: bool = True,
                   batches: Sequence[int] = (1, 2, 4, 8, 16), depthwise: bool = False) -> list[dict[str, Any]]:
    """The settings tried by :func:`speed_sweep`: the bundle's own first (the reference), then sliding-window batch
    sizes, channels-last memory format, ``torch.inference_mode`` against ``torch.no_grad`` (what MONAI's evaluators
    use) and autocast (float16 on CUDA, bfloat16 on CPU); on CPU, for a network with
    :class:`~medseg_nets.blocks.depthwise.DepthwiseConv3d` layers (``depthwise``), also their plain ``nn.Conv3d``
    path."""
    sw0 = entry.sw_batch_size
    base = dict(sw_batch_size=sw0, channels_last=False, amp=False, inference_mode=False, depthwise_fast=True)
    out = [dict(base, name=f"bundle config (no_grad, fp32, sw_batch_size {sw0})")]
    if depthwise and device.type == "cpu":
        out.append(dict(base, name="depth-wise convolutions as plain nn.Conv3d (DepthwiseConv3d.cpu_fast_path off)",
                        depthwise_fast=False))
    out.append(dict(base, name="inference_mode", inference_mode=True))
    for sw in sorted(set(batches) - {sw0}):
        out.append(dict(base, name=f"inference_mode, sw_batch_size {sw}", inference_mode=True, sw_batch_size=sw))
    out.append(dict(base, name="inference_mode, channels-last", inference_mode=True, channels_last=True))
    if amp_allowed:
        dtype = "float16" if device.type == "cuda" else "bfloat16"
        out.append(dict(base, name=f"inference_mode, AMP {dtype}", inference_mode=True, amp=True))
        out.append(dict(base, name=f"inference_mode, channels-last, AMP {dtype}", inference_mode=True,
                        channels_last=True, amp=True))
    return out


def speed_sweep(entry: Entry, device: torch.device, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Whole-volume inference time of the bundle's network under each of :func:`sweep_variants`, and how far each
    variant's output is from the bundle's own settings: max |logit difference| and the fraction of voxels whose
    predicted label changes (argmax or per-channel sigmoid > 0.5, as the bundle reads them)."""
    if entry.volume is None:
        raise SkipEntry(f"{entry.bundle} has no whole-volume setting to sweep")
    spec = next(m for m in entry.models if m.role == "bundle")
    torch.manual_seed(0)
    net = spec.build().eval().to(device)
    vol = torch.randn(1, *entry.volume, generator=torch.Generator().manual_seed(0)).to(device)
    activation = BUNDLES[entry.bundle].get("activation", "softmax")
    rows: list[dict[str, Any]] = []
    ref_logits = ref_labels = None
    # the plain depth-wise row only where it differs from the reference row
    depthwise = set_cpu_fast_path(net, not opts.plain_depthwise) > 0 and not opts.plain_depthwise
    variants = sweep_variants(entry, device, amp_allowed=not opts.sweep_no_amp, batches=opts.sweep_batches,
                              depthwise=depthwise)
    # contiguous variants first: channels-last converts the weights in place
    variants.sort(key=lambda v: v["channels_last"])
    for v in variants:
        set_cpu_fast_path(net, v["depthwise_fast"] and not opts.plain_depthwise)
        model = ChannelsLast(net, entry.dims) if v["channels_last"] else FirstOutput(net)
        e = Entry(**{**entry.__dict__, "sw_batch_size": v["sw_batch_size"]})
        inferer = _inferer(e, device)
        grad_ctx = torch.inference_mode if v["inference_mode"] else torch.no_grad
        row = dict(v, volume=list(entry.volume), times_s=[], volume_s=None, max_abs_diff=None, changed_fraction=None,
                   error=None)
        try:
            with grad_ctx(), _autocast(device, v["amp"]):
                # warm-up (lazy initialisation, allocator): one window, not the whole volume
                model(torch.randn(1, entry.in_channels, *entry.roi, device=device))
                for _ in range(opts.volume_repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = inferer(vol, model)
                    _sync(device)
                    row["times_s"].append(time.perf_counter() - t0)
            out = out.float().cpu()
            row["volume_s"] = statistics.median(row["times_s"])
            labels = _labels(out, activation)
            if ref_logits is None:
                ref_logits, ref_labels = out, labels
            row["max_abs_diff"] = float((out - ref_logits).abs().max())
            row["changed_fraction"] = float((labels != ref_labels).float().mean())
            log(f"  sweep {v['name']}: {row['volume_s']:.1f} s, max |diff| {row['max_abs_diff']:.2e}, "
                f"changed {100 * row['changed_fraction']:.4f}%")
        except Exception as err:  # noqa: BLE001 - e.g. autocast unsupported: report, go on
            row["error"] = f"{type(err).__name__}: {_short(err)}"
            log(f"  sweep {v['name']}: failed: {row['error']}")
        rows.append(row)
        del model
    base_s = rows[0]["volume_s"]
    for r in rows:
        r["speedup"] = base_s / r["volume_s"] if base_s and r["volume_s"] else None
    return rows


def render_sweep(bundle: str, entry: Entry, rows: list[dict[str, Any]]) -> str:
    inf = f"SliceInferer(spatial_dim={entry.slice_axis})" if entry.dims == 2 else "SlidingWindowInferer"
    lines = [
        f"## Inference-speed sweep: {bundle} ({inf}, roi {_shape(entry.roi)}, overlap {entry.overlap}, "
        f"{entry.mode} blending, random {_shape(entry.volume)} volume)",
        "",
        "Reference: the first row (the bundle's inference.json settings). Changed voxels: predicted labels that differ "
        "from the reference's.",
        "",
        "| Setting | Whole volume s | Speed-up | Max abs logit diff | Changed voxels % |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["name"] + (f" (failed: {r['error']})" if r["error"] else "")
        lines.append(f"| {name} | {_fmt(r['volume_s'], '.1f')} | {_fmt(r['speedup'], '.2f')} | "
                     f"{_fmt(r['max_abs_diff'], '.1e')} | "
                     f"{_fmt(None if r['changed_fraction'] is None else 100 * r['changed_fraction'], '.4f')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import monai

    gpu = torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available() else "none"
    try:
        import medseg_nets

        medseg_version = medseg_nets.__version__
    except Exception:  # noqa: BLE001
        medseg_version = "?"
    return dict(
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        cpu=_cpu_model(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), gpu=gpu,
        device=str(device), torch=torch.__version__, monai=monai.__version__, medseg_nets=medseg_version,
        python=platform.python_version(), platform=platform.platform(), load_start=_loadavg(),
    )


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _shape(entry_shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in entry_shape)


def _header_lines(meta: dict[str, Any], title: str = "# medseg-bundles benchmark") -> list[str]:
    """Date, machine, load, versions and the exact command: the first lines of every report."""
    cuda = meta["device"].startswith("cuda")
    lines = [
        title,
        "",
        f"- Date: {meta['date']}",
        f"- Machine: CPU {meta['cpu']} ({meta['logical_cpus']} logical CPUs), torch threads {meta['torch_threads']}; "
        f"GPU: {meta['gpu']}; device used: {meta['device']}; AMP: "
        + (("float16" if cuda else "bfloat16") + " autocast" if meta["amp"] else "off"),
        f"- CPU load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}"
        + (" (other processes shared the CPU: timings are inflated and noisy)"
           if meta["load_start"] and meta["load_end"] and max(meta["load_start"][0], meta["load_end"][0])
           > 1.25 * (meta["logical_cpus"] or 1) else ""),
        *(["- Depth-wise convolutions: plain nn.Conv3d (`--plain-depthwise`)"] if meta.get("plain_depthwise") else []),
        "- CPU allocator (timings): " + ("glibc malloc keeps freed memory for reuse (`--keep-freed-memory`, as the "
                                         "bundles run)" if meta.get("keep_freed_memory") else "process default"),
        f"- Versions: torch {meta['torch']}, monai {meta['monai']}, medseg_nets {meta['medseg_nets']}, "
        f"python {meta['python']}",
        f"- Command: `{meta['command']}`",
    ]
    return lines


def render_markdown(meta: dict[str, Any], entries: list[Entry], results: list[dict], skipped: list[str]) -> str:
    cuda = meta["device"].startswith("cuda")
    mem_col = "Peak fwd mem MiB (CUDA alloc above model+input)" if cuda else \
        "Peak fwd mem MiB (CPU RSS growth, fresh process)"
    lines = _header_lines(meta) + [
        f"- Latency: median of {meta['repeats']} forwards, torch.inference_mode, random weights and input, after "
        f"{meta['warmup'] + 1} warm-up forwards. GFLOPs: torch.utils.flop_counter.FlopCounterMode for one forward of "
        "the whole batch (multiply-add = 2 FLOPs; norms/activations not counted).",
        "- Peak memory: " + ("torch.cuda.max_memory_allocated during one forward minus the memory allocated before "
                             "it (weights and input excluded)." if cuda else
                             "growth of the process resident set (Linux VmHWM - VmRSS, high-water mark reset via "
                             "/proc/self/clear_refs) during one forward in a fresh process per model; weights and "
                             "input excluded; includes allocator/oneDNN overheads."
                             + (" Measured in-process (--memory inprocess): indicative only." if
                                meta["memory"] == "inprocess" else "")),
    ]
    if meta["scale"] != 1.0 or meta["roi"] or meta["volume"]:
        lines.append("- **Sizes changed** (--scale/--roi/--volume): these figures are not at the bundles' real "
                     "patch and volume sizes.")
    vol_entries = [e for e in entries if e.volume is not None]
    if meta["skip_volume"]:
        lines.append("- Whole volume: skipped (--skip-volume).")
    elif vol_entries:
        for e in vol_entries:
            inf = ("SliceInferer(spatial_dim=%s, " % (e.slice_axis if e.slice_axis is not None else 2)) \
                if e.dims == 2 else "SlidingWindowInferer("
            lines.append(f"- Whole volume ({e.bundle}): {inf}roi_size={_shape(e.roi)}, overlap={e.overlap}, "
                         f"mode={e.mode}, sw_batch_size={e.sw_batch_size}) on a random {_shape(e.volume)} volume "
                         f"(batch 1), median of {meta['volume_repeats']} run(s), input and output on {meta['device']}.")
    lines.append("- Ratios: baseline / bundle network (> 1: the baseline is bigger or slower; < 1: smaller or "
                 "faster).")
    lines += [
        "",
        f"| Bundle | Model | Input (BxCxspatial) | Params | GFLOPs | Latency ms | {mem_col} | Whole volume s | "
        "Params ratio | GFLOPs ratio | Latency ratio | Memory ratio | Volume ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = f"**{r['model']}**" if r["role"] == "bundle" else r["model"]
        if r["errors"]:
            name += " (see notes)"
        lines.append(
            f"| {r['bundle']} | {name} | {_shape(r['input_shape'])} | {_fmt(r['params'], ',')} | "
            f"{_fmt(r['gflops'], '.2f')} | "
            f"{_fmt(r['latency_ms'], '.1f')} | {_fmt(r['peak_mem_mib'], '.0f')} | {_fmt(r['volume_s'], '.1f')} | "
            f"{_fmt(r['ratio_params'], '.2f')} | {_fmt(r['ratio_gflops'], '.2f')} | "
            f"{_fmt(r['ratio_latency_ms'], '.2f')} | {_fmt(r['ratio_peak_mem_mib'], '.2f')} | "
            f"{_fmt(r['ratio_volume_s'], '.2f')} |"
        )
    lines += ["", "Models:"]
    seen = set()
    for e in entries:
        for m in e.models:
            if (e.bundle, m.name) not in seen:
                seen.add((e.bundle, m.name))
                lines.append(f"- {e.bundle} / {m.name}: {m.description}")
    notes = [n for e in entries for n in e.notes] + [f"skipped {s}" for s in skipped]
    notes += [f"{r['bundle']} / {r['model']} (batch {r['batch']}): {err}" for r in results for err in r["errors"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--bundle", action="append", choices=sorted(BUNDLES), help="bundle to benchmark (repeatable)")
    which.add_argument("--all", action="store_true", help="every registry entry that is available, one table")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: medseg_nets.utils.keep_freed_memory() for the whole run (glibc malloc reuses freed "
                        "memory; what the bundles' configs do), applied to every model alike")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards after the FLOP-counting one")
    p.add_argument("--volume-repeats", type=int, default=1, help="timed whole-volume runs per model")
    p.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--skip-volume", action="store_true", help="leave out the whole-volume sliding-window time")
    p.add_argument("--scale", type=float, default=1.0,
                   help="scale the patch (kept a multiple of the entry's divisor) and volume sizes, e.g. 0.25 for a "
                        "quick run; figures are then not those of the bundle's real sizes")
    p.add_argument("--roi", default=None,
                   help="patch size override: one int for every spatial dim or comma-separated, e.g. 32 or 32,32,16")
    p.add_argument("--volume", default=None,
                   help="whole-volume spatial size override, comma-separated, e.g. 60,60,40 (channels: the net's)")
    p.add_argument("--baselines", default=None, help="comma-separated subset of the baselines to run")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "none"],
                   help="CPU peak memory: fresh subprocess per model (honest, ~15 s start-up each), in this process "
                        "(indicative only) or not measured. CUDA always measures in process.")
    p.add_argument("--fallback-nets", action="store_true",
                   help="for entries without a bundle folder, instantiate the medseg_nets.nets class with the "
                        "registry's documented defaults instead of skipping")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the comparison: whole-volume time of each bundle network under other inference "
                        "settings (sliding-window batch, inference_mode, channels-last, AMP) and how much each "
                        "changes the output")
    p.add_argument("--sweep-batches", default="1,2,4,8,16",
                   help="sliding-window batch sizes tried by --sweep besides the bundle's own (comma-separated)")
    p.add_argument("--sweep-no-amp", action="store_true",
                   help="leave the autocast variants out of --sweep (bfloat16 autocast is slow on CPUs without "
                        "native bfloat16)")
    p.add_argument("--plain-depthwise", action="store_true",
                   help="run DepthwiseConv3d layers as plain nn.Conv3d (their channels-last CPU path off), to compare")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: where one forward of each bundle's network spends its time, by kind of "
                        "layer (forward hooks) and by operator (torch.profiler)")
    p.add_argument("--plot", default=None,
                   help="also draw a PNG of latency and whole-volume time against GFLOPs for every model measured")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--json", default=None, help="write every raw figure here")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker is None and not args.bundle and not args.all:
        p.error("give --bundle NAME or --all")
    args.sweep_batches = tuple(int(b) for b in args.sweep_batches.split(",") if b.strip())
    if args.repeats < 1 or args.volume_repeats < 1 or args.warmup < 0:
        p.error("--repeats and --volume-repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.memory_worker is not None:
        _memory_worker(opts.memory_worker)
        return {}
    if opts.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if opts.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        device = torch.device(opts.device)
    opts.keep_freed_memory = keep_freed_memory(device, opts.keep_freed_memory)
    baselines = None
    if opts.baselines:
        baselines = [b.strip() for b in opts.baselines.split(",") if b.strip()]
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise SystemExit(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")

    roi = [int(v) for v in opts.roi.split(",")] if opts.roi else None
    volume = [int(v) for v in opts.volume.split(",")] if opts.volume else None
    names = list(BUNDLES) if opts.all else list(dict.fromkeys(opts.bundle))
    entries, skipped = [], []
    for name in names:
        try:
            entries.append(resolve_entry(name, opts.fallback_nets, baselines, opts.scale, roi, volume))
        except SkipEntry as e:
            skipped.append(f"{name}: {e}")
            log(f"skipping {name}: {e}")
    if not entries:
        raise SystemExit("nothing to benchmark: " + "; ".join(skipped))

    meta = machine_info(device)
    meta.update(command="python tools/benchmark.py " + shlex.join(argv), amp=opts.amp, repeats=opts.repeats,
                warmup=opts.warmup, volume_repeats=opts.volume_repeats, skip_volume=opts.skip_volume,
                scale=opts.scale, memory=opts.memory, roi=opts.roi, volume=opts.volume,
                keep_freed_memory=opts.keep_freed_memory, plain_depthwise=opts.plain_depthwise)
    if opts.sweep:
        return run_sweep(entries, skipped, device, opts, meta)
    if opts.profile:
        return run_profile(entries, skipped, device, opts, meta)
    results: list[dict] = []
    t_start = time.perf_counter()
    for entry in entries:
        log(f"{entry.bundle}: roi {entry.roi}, volume {entry.volume}, in {entry.in_channels} out "
            f"{entry.out_channels}, {len(entry.models)} models on {device}")
        for spec in entry.models:
            try:
                results += measure_model(entry, spec, device, opts)
            except Exception as e:  # noqa: BLE001 - e.g. the network cannot be built
                log(f"  {spec.name}: failed: {_short(e)}")
                batch = entry.batches[0]
                results.append(dict(
                    bundle=entry.bundle, model=spec.name, role=spec.role, description=spec.description, batch=batch,
                    input_shape=[batch, entry.in_channels, *entry.roi], params=None, gflops=None, latency_ms=None,
                    latencies_ms=[], peak_mem_mib=None, volume_s=None, volume_times_s=[],
                    errors=[f"build: {type(e).__name__}: {_short(e)}"]))
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = _loadavg()
    add_ratios(results)
    markdown = render_markdown(meta, entries, results, skipped)
    print(markdown)
    report = dict(meta=meta, entries=[dict(bundle=e.bundle, dims=e.dims, in_channels=e.in_channels,
                                           out_channels=e.out_channels, roi=list(e.roi),
                                           volume=list(e.volume) if e.volume else None, sw_batch_size=e.sw_batch_size,
                                           overlap=e.overlap, mode=e.mode, slice_axis=e.slice_axis,
                                           source=e.source, notes=e.notes) for e in entries],
                  results=results, skipped=skipped, markdown=markdown)
    if opts.plot:
        plot_costs(results, meta, opts.plot)
    _write_outputs(opts, markdown, report)
    log(f"done in {meta['wall_s']:.0f} s")
    return report


def _write_outputs(opts: argparse.Namespace, markdown: str, report: dict[str, Any]) -> None:
    if opts.out or opts.json:
        from medseg_nets.utils import atomic_write_json, atomic_write_text

        if opts.out:
            atomic_write_text(opts.out, markdown)
        if opts.json:
            atomic_write_json(opts.json, report)


def run_sweep(entries: list[Entry], skipped: list[str], device: torch.device, opts: argparse.Namespace,
              meta: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    sections, sweeps = [], {}
    for entry in entries:
        log(f"{entry.bundle}: inference-speed sweep on {entry.volume}")
        try:
            sweeps[entry.bundle] = rows = speed_sweep(entry, device, opts)
        except SkipEntry as e:
            skipped.append(f"{entry.bundle}: {e}")
            continue
        sections.append(render_sweep(entry.bundle, entry, rows))
    notes = [f"- Whole-volume time: median of {meta['volume_repeats']} run(s) after a warm-up forward of one window, "
             "random weights and input; input and output on the device used."]
    return _finish_report(opts, meta, t_start, "# medseg-bundles inference-speed sweep", notes, sections, skipped,
                          sweeps=sweeps)


def _finish_report(opts: argparse.Namespace, meta: dict[str, Any], t_start: float, title: str, notes: list[str],
                   sections: list[str], skipped: list[str], **payload: Any) -> dict[str, Any]:
    """Header (machine, versions, command, ``notes``), the sections, printed and written (``--out``/``--json``)
    for the sweep and profile modes; returns the report (``payload`` added to it)."""
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = _loadavg()
    lines = _header_lines(meta, title) + notes
    if meta["scale"] != 1.0 or meta["roi"] or meta["volume"]:
        lines.append("- **Sizes changed** (--scale/--roi/--volume): not the bundles' real patch and volume sizes.")
    lines += [f"- skipped {s}" for s in skipped]
    markdown = "\n".join(lines) + "\n\n" + "\n".join(sections)
    print(markdown)
    report = dict(meta=meta, **payload, skipped=skipped, markdown=markdown)
    _write_outputs(opts, markdown, report)
    log(f"done in {meta['wall_s']:.0f} s")
    return report


def layer_kind(module: nn.Module) -> str:
    """How :func:`profile_layers` groups a leaf module: its class, and for convolutions the kernel, dilation, stride
    and whether it is depth-wise (``groups == in_channels > 1``) or grouped."""
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = module.groups
        kind = "depth-wise" if groups > 1 and groups == module.in_channels else f"groups {groups}" if groups > 1 \
            else "dense"
        name += (f" {kind} k{'x'.join(map(str, module.kernel_size))} dilation {module.dilation[0]} "
                 f"stride {module.stride[0]}")
    return name


def profile_layers(model: nn.Module, x: torch.Tensor, device: torch.device, row_limit: int = 15
                   ) -> tuple[list[dict[str, Any]], float, str]:
    """Time one forward of ``model`` on ``x`` under ``torch.inference_mode`` (after one warm-up forward): per kind of
    leaf module (:func:`layer_kind`; forward hooks, synchronised on CUDA) and per operator (``torch.profiler``,
    self time). Returns the per-kind rows (sorted by time), the forward's wall time in seconds and the operator
    table as text. Time outside leaf modules (functional code in ``forward``) is the difference to the total."""
    from torch.profiler import ProfilerActivity, profile

    spent: dict[str, list[float]] = {}
    started: dict[int, float] = {}
    handles = []

    def pre(mod: nn.Module, _inp: Any) -> None:
        _sync(device)
        started[id(mod)] = time.perf_counter()

    def post(mod: nn.Module, _inp: Any, _out: Any) -> None:
        _sync(device)
        rec = spent.setdefault(layer_kind(mod), [0.0, 0])
        rec[0] += time.perf_counter() - started.pop(id(mod))
        rec[1] += 1

    with torch.inference_mode():
        model(x)  # warm-up
        for m in model.modules():
            if next(m.children(), None) is None:
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            total = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            model(x)
            _sync(device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=row_limit)
    rows = [dict(kind=k, seconds=v[0], calls=v[1], share=v[0] / total) for k, v in spent.items()]
    rows.sort(key=lambda r: -r["seconds"])
    return rows, total, table


def run_profile(entries: list[Entry], skipped: list[str], device: torch.device, opts: argparse.Namespace,
                meta: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    sections, profiles = [], {}
    for entry in entries:
        spec = next(m for m in entry.models if m.role == "bundle")
        log(f"{entry.bundle}: profiling one forward of {spec.name} at {entry.roi}")
        torch.manual_seed(0)
        model = FirstOutput(spec.build()).eval().to(device)
        set_cpu_fast_path(model, not opts.plain_depthwise)
        x = torch.randn(1, entry.in_channels, *entry.roi, device=device)
        with _autocast(device, opts.amp):
            rows, total, table = profile_layers(model, x, device)
        in_leaves = sum(r["seconds"] for r in rows)
        profiles[entry.bundle] = dict(model=spec.name, input_shape=list(x.shape), total_s=total, layers=rows,
                                      operators=table)
        lines = [f"## Profile: {spec.name}, input {_shape(x.shape)}, one forward {total:.2f} s", "",
                 "| Layer kind | Calls | Time s | Share % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['calls']} | {r['seconds']:.3f} | {100 * r['share']:.1f} |" for r in rows]
        lines.append(f"| (outside leaf modules) | - | {total - in_leaves:.3f} | {100 * (1 - in_leaves / total):.1f} |")
        lines += ["", "Operators (torch.profiler, a third forward, self time):", "", "```", table.strip(), "```", ""]
        sections.append("\n".join(lines))
        del model
    notes = ["- One forward at the bundle's patch size, batch 1, random weights, torch.inference_mode, after a "
             "warm-up forward. Layer times come from forward hooks (a CUDA sync around each on CUDA) and add a little "
             "overhead."]
    return _finish_report(opts, meta, t_start, "# medseg-bundles profile", notes, sections, skipped,
                          profiles=profiles)


def plot_costs(results: list[dict], meta: dict[str, Any], path: str) -> None:
    """Two panels, log-log: forward latency vs GFLOPs (patch, batch 1) and whole-volume time vs GFLOPs; one colour
    per bundle entry, filled markers for the bundles' networks. Only measured points are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["batch"] == min(x["batch"] for x in results if x["bundle"] == r["bundle"])]
    bundles = list(dict.fromkeys(r["bundle"] for r in rows))
    colours = {b: plt.get_cmap("tab10")(i) for i, b in enumerate(bundles)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], "latency_ms", "forward latency at the patch size, ms"),
                           (axes[1], "volume_s", "whole-volume inference time, s")):
        drawn = False
        for r in rows:
            if r["gflops"] is None or r[key] is None:
                continue
            drawn = True
            own = r["role"] == "bundle"
            ax.scatter(r["gflops"], r[key], s=70 if own else 40, color=colours[r["bundle"]],
                       marker="o" if own else "^", edgecolors="black" if own else "none", zorder=3)
            ax.annotate(r["model"].replace(" (bundle)", ""), (r["gflops"], r[key]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GFLOPs of one forward at the patch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    handles = [plt.Line2D([], [], color=colours[b], marker="o", linestyle="", label=b) for b in bundles]
    handles += [plt.Line2D([], [], color="grey", marker="o", markeredgecolor="black", linestyle="",
                           label="bundle network"),
                plt.Line2D([], [], color="grey", marker="^", linestyle="", label="MONAI baseline")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{meta['date']} - {meta['cpu']} - device {meta['device']}", fontsize=8, y=0.02)
    fig.tight_layout(rect=(0, 0.04, 1, 0.93))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
