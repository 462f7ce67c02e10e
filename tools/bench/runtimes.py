"""Inference runtimes (``--runtimes``): eager PyTorch, torch.compile, ONNX Runtime and OpenVINO on one network.

More rows compare eager PyTorch with itself: ``plain`` runs a copy of the network with every CPU fast-path layer
off (:func:`medseg_nets.blocks.depthwise.set_cpu_fast_path`; what those layers gain, and how far they move the
output), ``nonative`` the network with the fused C kernels of :mod:`medseg_nets.native` off (the CPU layers'
PyTorch paths), ``float64`` a copy in double precision (the float32 rounding of eager PyTorch itself, for scale).

For each network (a bundle's ``network_def``, and the entry's baselines named by ``--baselines``) at the bundle's
patch size and ``--batch``, :func:`time_runtimes` runs each requested runtime once (its one-off cost: export,
session, compilation and the first call) and compares that output with eager PyTorch's (max abs difference, and
that difference relative to the range of the eager output: issue 16 allows 1e-4), then times ``--repeats``
interleaved rounds (each round runs every runtime once, in turn, so that a change of load hits them alike).

ONNX Runtime and OpenVINO run through :class:`medseg_nets.runtime.RuntimeNetwork`, what a bundle would use: the
dynamo ONNX export with a dynamic batch (traced at batch 2), ONNX Runtime with all graph optimisations, OpenVINO CPU
with f32 precision and the latency hint, both on the run's threads; the export is cached next to a checkpoint of the
network's random weights in a temporary folder, so the second ONNX runtime reuses the first one's file. Its own
check against eager is off here (this module measures the difference instead). torch.compile is inductor, default
mode. A runtime whose packages are missing, or that falls back to eager, gets a row saying so, without timings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bench.common import log, short
from bench.registry import Entry, FirstOutput
from bench.report import finish_report, fmt, fmt_shape, loadavg
from medseg_nets import native
from medseg_nets.blocks.depthwise import set_cpu_fast_path

#: the names ``--runtimes`` takes, and what each is called in the report
RUNTIME_NAMES = {"eager": "eager", "plain": "eager, plain PyTorch layers",
                 "nonative": "eager, native kernels off", "float64": "eager, float64",
                 "compile": "torch.compile", "ort": "ONNX Runtime", "ov": "OpenVINO"}
_ALIASES = {"onnxruntime": "ort", "openvino": "ov", "torch": "eager", "inductor": "compile"}


def parse_runtimes(text: str) -> list[str]:
    """``eager,ort,ov,compile`` (aliases ``onnxruntime``, ``openvino``, ``inductor``) -> canonical names, eager
    first (the reference) and each once. Raises ``ValueError`` on an unknown name."""
    names = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in RUNTIME_NAMES:
            raise ValueError(f"unknown runtime {raw.strip()!r}; known: {', '.join(RUNTIME_NAMES)} "
                             f"(or {', '.join(_ALIASES)})")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no runtime named")
    return ["eager"] + [n for n in names if n != "eager"]


def _runtime_callable(name: str, net: nn.Module, x: torch.Tensor, ckpt: Path, threads: int
                      ) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """The call that runs ``net`` on ``x`` under runtime ``name``, and what is known about it before its first
    call (availability)."""
    if name == "eager":
        return (lambda: net(x)), {}
    if name == "plain":  # the same weights with every CPU fast-path layer off: what those layers gain and change
        plain = copy.deepcopy(net)
        set_cpu_fast_path(plain, False)
        return (lambda: plain(x)), {}
    if name == "nonative":  # the fused C kernels off for this call only: what they gain and change

        def without_native() -> torch.Tensor:
            previous = native.set_enabled(False)
            try:
                return net(x)
            finally:
                native.set_enabled(previous)

        return without_native, {}
    if name == "float64":  # the same network in double precision: how far float32 eager is from exact arithmetic
        double, xd = copy.deepcopy(net).double(), x.double()
        return (lambda: double(xd).float()), {}
    if name == "compile":
        compiled = torch.compile(net)
        return (lambda: compiled(x)), {}
    from medseg_nets.runtime import RuntimeNetwork, available_runtimes

    runtime = "onnxruntime" if name == "ort" else "openvino"
    if runtime not in available_runtimes():
        extra = "onnx" if name == "ort" else "openvino"
        return None, {"unavailable": f"{runtime} not installed (pip install -e '.[{extra}]')"}
    wrapper = RuntimeNetwork(net, runtime=runtime, ckpt_path=ckpt, num_threads=threads, verify=False).eval()
    return (lambda: wrapper(x)), {"wrapper": wrapper}


def time_runtimes(net: nn.Module, x: torch.Tensor, runtimes: Sequence[str], repeats: int, threads: int,
                  work: Path) -> list[dict[str, Any]]:
    """One row per runtime (eager first): first-call seconds, max abs difference from eager (and / range), the
    ``repeats`` interleaved times and their median, the speed-up over eager's median; ``error`` where the runtime
    did not run (then no times)."""
    net = net.eval()
    ckpt = work / "random_weights.pt"
    torch.save(net.state_dict(), ckpt)  # RuntimeNetwork caches the export next to it (shared by ORT and OpenVINO)
    rows: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    ref = None
    rng = None
    with torch.no_grad():
        for name in runtimes:
            row: dict[str, Any] = dict(runtime=name, label=RUNTIME_NAMES[name], first_call_s=None, export_reused=None,
                                       max_abs_diff=None, diff_over_range=None, times_s=[], median_s=None,
                                       speedup=None, error=None, load=[loadavg()])
            rows[name] = row
            try:
                fn, info = _runtime_callable(name, net, x, ckpt, threads)
                if fn is None:
                    row["error"] = info["unavailable"]
                    log(f"  {row['label']}: {row['error']}")
                    continue
                t0 = time.perf_counter()
                y = fn()
                row["first_call_s"] = time.perf_counter() - t0
                wrapper = info.get("wrapper")
                if wrapper is not None:
                    if wrapper.active_runtime == "eager":
                        row["error"] = "fell back to eager PyTorch: " + str(getattr(wrapper, "_disabled", "") or "?")
                        log(f"  {row['label']}: {row['error']}")
                        continue
                    row["export_reused"] = bool((wrapper.last_export or {}).get("reused"))
                if ref is None:  # eager: the reference
                    ref = y
                    rng = float(ref.max() - ref.min())
                diff = float((y - ref).abs().max())
                row.update(max_abs_diff=diff, diff_over_range=diff / rng if rng else None)
                calls[name] = fn
                log(f"  {row['label']}: first call {row['first_call_s']:.1f} s, max abs diff {diff:.3g}"
                    + (f" ({diff / rng:.2g} of the range)" if rng else ""))
            except Exception as e:  # noqa: BLE001 - the row says why; the other runtimes go on
                row["error"] = f"{type(e).__name__}: {short(e)}"
                log(f"  {row['label']}: failed: {row['error']}")
        for rep in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                rows[name]["times_s"].append(time.perf_counter() - t0)
            log(f"  round {rep + 1}/{repeats}: " + " ".join(f"{RUNTIME_NAMES[n]} {rows[n]['times_s'][-1]:.3f} s"
                                                            for n in calls))
    for row in rows.values():
        row["load"].append(loadavg())
        if row["times_s"]:
            row["median_s"] = statistics.median(row["times_s"])
    eager = rows["eager"]["median_s"] if "eager" in rows else None
    for row in rows.values():
        if eager and row["median_s"]:
            row["speedup"] = eager / row["median_s"]
    return list(rows.values())


def render_runtimes(results: list[dict[str, Any]]) -> list[str]:
    lines = ["## Runtimes", "",
             "| network, input | runtime | median s | speed-up vs eager | max abs diff | diff / range | "
             "first call s | load 1 min start/end |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for res in results:
        head = f"{res['network']}, {fmt_shape(res['input_shape'])}"
        for i, r in enumerate(res["rows"]):
            first = fmt(r["first_call_s"], ".1f") + (" (export reused)" if r["export_reused"] else "")
            label = r["label"] + (f" ({r['error']})" if r["error"] else "")
            loads = "/".join(str(v[0]) if v else "?" for v in r["load"])
            lines.append(f"| {head if i == 0 else ''} | {label} | {fmt(r['median_s'], '.3f')} | "
                         f"{fmt(r['speedup'], '.2f')} | {fmt(r['max_abs_diff'], '.2g')} | "
                         f"{fmt(r['diff_over_range'], '.2g')} | {first} | {loads} |")
        if res.get("error"):
            lines.append(f"| {head} | (not built: {res['error']}) | | | | | | |")
    return ["\n".join(lines) + "\n"]


def run_runtimes(entries: list[Entry], skipped: list[str], opts: argparse.Namespace, meta: dict[str, Any]
                 ) -> dict[str, Any]:
    """``--runtimes``: every model of every entry (the bundle's network, and the baselines ``--baselines`` names)
    under each runtime (:func:`time_runtimes`); the report printed and written (``--out``, ``--json``)."""
    t_start = time.perf_counter()
    runtimes = parse_runtimes(opts.runtimes)
    threads = torch.get_num_threads()
    versions = {}
    for mod in ("onnxruntime", "openvino", "onnx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed
            versions[mod] = "not installed"
    meta.update(runtimes=runtimes, batch=opts.batch, runtime_versions=versions)
    results = []
    for entry in entries:
        for spec in entry.models:
            shape = [opts.batch, entry.in_channels, *entry.roi]
            res: dict[str, Any] = dict(bundle=entry.bundle, network=spec.name, description=spec.description,
                                       input_shape=shape, rows=[], error=None)
            results.append(res)
            log(f"{entry.bundle} / {spec.name}: {', '.join(RUNTIME_NAMES[r] for r in runtimes)} at {shape}")
            try:
                torch.manual_seed(0)
                net = FirstOutput(spec.build()).eval()
                set_cpu_fast_path(net, not opts.plain_layers)
            except Exception as e:  # noqa: BLE001
                res["error"] = f"{type(e).__name__}: {short(e)}"
                log(f"  not built: {res['error']}")
                continue
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
            with tempfile.TemporaryDirectory(prefix="medseg_runtimes_") as tmp:
                res["rows"] = time_runtimes(net, x, runtimes, opts.repeats, threads, Path(tmp))
            del net
    notes = [f"- Each runtime's first call (export, session or compilation, one forward) is its one-off cost and "
             f"gives the difference from eager; then {opts.repeats} interleaved rounds, median reported. Random "
             f"weights (seed 0) and input, torch.no_grad, batch {opts.batch}, {threads} thread(s) for every runtime.",
             "- ONNX Runtime / OpenVINO through medseg_nets.runtime.RuntimeNetwork (dynamo export, dynamic batch "
             "traced at batch 2; ORT all graph optimisations; OpenVINO CPU f32, latency hint); torch.compile: "
             "inductor, default mode. Issue 16 allows a difference of 1e-4 of the range.",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return finish_report(opts, meta, t_start, "# medseg-bundles inference runtimes", notes,
                         render_runtimes(results), skipped, runtimes=results)
