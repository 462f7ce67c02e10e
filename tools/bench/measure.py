"""The comparison table (the default mode): every figure of each model of each entry, side by side.

:func:`measure_model` measures one model (bundle network or baseline) at each of the entry's batch sizes: parameters,
GFLOPs of one forward (``torch.utils.flop_counter.FlopCounterMode``), forward latency (:mod:`bench.timing`), peak
forward memory (:mod:`bench.memory`) and the whole-volume time through the bundle's inferer. A failure is written into
the row's ``errors`` and the run goes on. :func:`run_comparison` measures every model of every entry and writes the
report (:mod:`bench.report`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.common import log, short
from bench.memory import cpu_forward_peak_rss_mib, cpu_memory_subprocess, cuda_forward_peak_mib
from bench.registry import Entry, FirstOutput, ModelSpec
from bench.report import add_ratios, loadavg, plot_costs, render_markdown, write_outputs
from bench.timing import autocast, forward_times_ms, make_inferer, volume_times_s
from medseg_nets.blocks.depthwise import set_cpu_fast_path


def measure_model(entry: Entry, spec: ModelSpec, device: torch.device, opts: argparse.Namespace) -> list[dict]:
    """All measurements of one model of ``entry``: one result dict per batch size."""
    torch.manual_seed(0)
    model = FirstOutput(spec.build()).eval()
    set_cpu_fast_path(model, not opts.plain_layers)
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
            with torch.inference_mode(), autocast(device, opts.amp):
                counter = FlopCounterMode(display=False)
                with counter:  # the counted pass doubles as the first warm-up
                    model(x)
                res["gflops"] = counter.get_total_flops() / 1e9
                times = forward_times_ms(model, x, device, opts.warmup, opts.repeats)
            res["latencies_ms"] = times
            res["latency_ms"] = statistics.median(times)
            log(f"  {spec.name} batch {batch}: {params:,} params, {res['gflops']:.2f} GFLOPs, "
                f"median {res['latency_ms']:.1f} ms")
        except Exception as e:  # noqa: BLE001 - report the failure in the table, go on with the others
            res["errors"].append(f"forward: {type(e).__name__}: {short(e)}")
            log(f"  {spec.name} batch {batch}: forward failed: {short(e)}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue

        if opts.memory != "none":
            try:
                if device.type == "cuda":
                    del x
                    torch.cuda.empty_cache()
                    x = torch.randn(*shape, device=device)
                    res["peak_mem_mib"] = cuda_forward_peak_mib(model, x, device, opts.amp)
                elif opts.memory == "inprocess":
                    res["peak_mem_mib"] = cpu_forward_peak_rss_mib(model, shape, opts.amp)
                else:
                    res["peak_mem_mib"] = cpu_memory_subprocess(dict(
                        bundle=entry.bundle, model=spec.name, fallback_nets=opts.fallback_nets, shape=list(shape),
                        amp=opts.amp, threads=torch.get_num_threads(),
                        plain_layers=opts.plain_layers))
                log(f"  {spec.name} batch {batch}: peak forward memory {res['peak_mem_mib']:.0f} MiB")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"memory: {type(e).__name__}: {short(e)}")
                log(f"  {spec.name} batch {batch}: memory measurement failed: {short(e)}")
        del x

        if b_idx == 0 and entry.volume is not None and not opts.skip_volume:
            try:
                inferer = make_inferer(entry, device)
                gen = torch.Generator().manual_seed(0)
                vol = torch.randn(1, *entry.volume, generator=gen).to(device)
                with torch.inference_mode(), autocast(device, opts.amp):
                    times = volume_times_s(inferer, vol, model, device, opts.volume_repeats)
                res["volume_times_s"] = times
                res["volume_s"] = statistics.median(times)
                log(f"  {spec.name}: whole volume {tuple(entry.volume)} in {res['volume_s']:.1f} s")
                del vol
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"volume: {type(e).__name__}: {short(e)}")
                log(f"  {spec.name}: whole-volume run failed: {short(e)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run_comparison(entries: list[Entry], skipped: list[str], device: torch.device, opts: argparse.Namespace,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """The comparison table of ``entries``: every model measured (:func:`measure_model`; a model that cannot be built
    gets a row with its error), the ratios added, the Markdown printed and written with the JSON report and the plot
    (``--out``, ``--json``, ``--plot``); returns the report."""
    results: list[dict] = []
    t_start = time.perf_counter()
    for entry in entries:
        log(f"{entry.bundle}: roi {entry.roi}, volume {entry.volume}, in {entry.in_channels} out "
            f"{entry.out_channels}, {len(entry.models)} models on {device}")
        for spec in entry.models:
            try:
                results += measure_model(entry, spec, device, opts)
            except Exception as e:  # noqa: BLE001 - e.g. the network cannot be built
                log(f"  {spec.name}: failed: {short(e)}")
                batch = entry.batches[0]
                results.append(dict(
                    bundle=entry.bundle, model=spec.name, role=spec.role, description=spec.description, batch=batch,
                    input_shape=[batch, entry.in_channels, *entry.roi], params=None, gflops=None, latency_ms=None,
                    latencies_ms=[], peak_mem_mib=None, volume_s=None, volume_times_s=[],
                    errors=[f"build: {type(e).__name__}: {short(e)}"]))
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = loadavg()
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
    write_outputs(opts, markdown, report)
    log(f"done in {meta['wall_s']:.0f} s")
    return report
