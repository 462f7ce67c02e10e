"""The inference-speed sweep (``--sweep``): a bundle's whole-volume inference under other settings.

:func:`sweep_variants` lists the settings (the bundle's own first, as the reference; sliding-window batch sizes,
``torch.inference_mode``, channels-last, autocast and, on CPU for a network with ``DepthwiseConv3d`` layers, their
plain ``nn.Conv3d`` path); :func:`speed_sweep` times the bundle's network under each and says how far each output
is from the reference's; :func:`render_sweep` writes one bundle's table and :func:`run_sweep` the whole report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from bench.common import log, short
from bench.registry import BUNDLES, Entry, FirstOutput, SkipEntry
from bench.report import finish_report, fmt, fmt_shape
from bench.timing import autocast, make_inferer, sync
from medseg_nets.blocks.depthwise import set_cpu_fast_path


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
    CPU fast-path layers (``depthwise``: :class:`~medseg_nets.blocks.depthwise.DepthwiseConv3d`,
    :mod:`medseg_nets.blocks.cpu`, GLIMS's fused DACB), also the plain PyTorch layers."""
    sw0 = entry.sw_batch_size
    base = dict(sw_batch_size=sw0, channels_last=False, amp=False, inference_mode=False, depthwise_fast=True)
    out = [dict(base, name=f"bundle config (no_grad, fp32, sw_batch_size {sw0})")]
    if depthwise and device.type == "cpu":
        out.append(dict(base, name="plain PyTorch layers (every cpu_fast_path off)", depthwise_fast=False))
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
    depthwise = set_cpu_fast_path(net, not opts.plain_layers) > 0 and not opts.plain_layers
    variants = sweep_variants(entry, device, amp_allowed=not opts.sweep_no_amp, batches=opts.sweep_batches,
                              depthwise=depthwise)
    # contiguous variants first: channels-last converts the weights in place
    variants.sort(key=lambda v: v["channels_last"])
    for v in variants:
        set_cpu_fast_path(net, v["depthwise_fast"] and not opts.plain_layers)
        model = ChannelsLast(net, entry.dims) if v["channels_last"] else FirstOutput(net)
        e = Entry(**{**entry.__dict__, "sw_batch_size": v["sw_batch_size"]})
        inferer = make_inferer(e, device)
        grad_ctx = torch.inference_mode if v["inference_mode"] else torch.no_grad
        row = dict(v, volume=list(entry.volume), times_s=[], volume_s=None, max_abs_diff=None, changed_fraction=None,
                   error=None)
        try:
            with grad_ctx(), autocast(device, v["amp"]):
                # warm-up (lazy initialisation, allocator): one window, not the whole volume
                model(torch.randn(1, entry.in_channels, *entry.roi, device=device))
                for _ in range(opts.volume_repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    out = inferer(vol, model)
                    sync(device)
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
            row["error"] = f"{type(err).__name__}: {short(err)}"
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
        f"## Inference-speed sweep: {bundle} ({inf}, roi {fmt_shape(entry.roi)}, overlap {entry.overlap}, "
        f"{entry.mode} blending, random {fmt_shape(entry.volume)} volume)",
        "",
        "Reference: the first row (the bundle's inference.json settings). Changed voxels: predicted labels that differ "
        "from the reference's.",
        "",
        "| Setting | Whole volume s | Speed-up | Max abs logit diff | Changed voxels % |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["name"] + (f" (failed: {r['error']})" if r["error"] else "")
        lines.append(f"| {name} | {fmt(r['volume_s'], '.1f')} | {fmt(r['speedup'], '.2f')} | "
                     f"{fmt(r['max_abs_diff'], '.1e')} | "
                     f"{fmt(None if r['changed_fraction'] is None else 100 * r['changed_fraction'], '.4f')} |")
    return "\n".join(lines) + "\n"


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
    return finish_report(opts, meta, t_start, "# medseg-bundles inference-speed sweep", notes, sections, skipped,
                         sweeps=sweeps)
