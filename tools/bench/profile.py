"""The per-layer profile (``--profile``): where one forward of a bundle's network spends its time.

:func:`profile_layers` times one forward by kind of leaf module (:func:`layer_kind`: the class, and for convolutions
kernel, dilation, stride and depth-wise or grouped; forward hooks), the fused C kernels of :mod:`medseg_nets.native`
called outside leaf modules (GLIMS's DACBs and Conv-IN-PReLU sequences) as kinds of their own, and by operator
(``torch.profiler``; the kernels appear there as ``medseg_nets.native.*`` records);
:func:`run_profile` does it for each entry's bundle network and writes the report.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn as nn

from bench.common import log
from bench.registry import Entry, FirstOutput
from bench.report import finish_report, fmt_shape
from bench.timing import autocast, sync
from medseg_nets import native
from medseg_nets.blocks.depthwise import set_cpu_fast_path

#: the kernels of medseg_nets.native timed as kinds of their own when called outside a leaf module
NATIVE_KERNELS = ("depthwise3d", "depthwise3d_branches", "norm_act")


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
        sync(device)
        started[id(mod)] = time.perf_counter()

    def post(mod: nn.Module, _inp: Any, _out: Any) -> None:
        sync(device)
        rec = spent.setdefault(layer_kind(mod), [0.0, 0])
        rec[0] += time.perf_counter() - started.pop(id(mod))
        rec[1] += 1

    in_kernel: list[str] = []

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if started or in_kernel:  # inside a timed leaf module or kernel call: its time already counts there
                return fn(*args, **kwargs)
            in_kernel.append(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                in_kernel.pop()
                rec = spent.setdefault(f"medseg_nets.native.{name} (fused C kernel)", [0.0, 0])
                rec[0] += time.perf_counter() - t0
                rec[1] += 1

        return call

    originals = {name: getattr(native, name) for name in NATIVE_KERNELS}
    with torch.inference_mode():
        model(x)  # warm-up
        for m in model.modules():
            if next(m.children(), None) is None:
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        for name, fn in originals.items():
            setattr(native, name, timed(name, fn))
        try:
            sync(device)
            t0 = time.perf_counter()
            model(x)
            sync(device)
            total = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
            for name, fn in originals.items():
                setattr(native, name, fn)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            model(x)
            sync(device)
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
        set_cpu_fast_path(model, not opts.plain_layers)
        x = torch.randn(1, entry.in_channels, *entry.roi, device=device)
        with autocast(device, opts.amp):
            rows, total, table = profile_layers(model, x, device)
        in_leaves = sum(r["seconds"] for r in rows)
        profiles[entry.bundle] = dict(model=spec.name, input_shape=list(x.shape), total_s=total, layers=rows,
                                      operators=table)
        lines = [f"## Profile: {spec.name}, input {fmt_shape(x.shape)}, one forward {total:.2f} s", "",
                 "| Layer kind | Calls | Time s | Share % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['calls']} | {r['seconds']:.3f} | {100 * r['share']:.1f} |" for r in rows]
        lines.append(f"| (outside leaf modules) | - | {total - in_leaves:.3f} | {100 * (1 - in_leaves / total):.1f} |")
        lines += ["", "Operators (torch.profiler, a third forward, self time):", "", "```", table.strip(), "```", ""]
        sections.append("\n".join(lines))
        del model
    notes = ["- One forward at the bundle's patch size, batch 1, random weights, torch.inference_mode, after a "
             "warm-up forward. Layer times come from forward hooks (a CUDA sync around each on CUDA) and add a little "
             "overhead."]
    return finish_report(opts, meta, t_start, "# medseg-bundles profile", notes, sections, skipped,
                         profiles=profiles)
