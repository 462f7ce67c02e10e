"""The reports: what the machine is, the Markdown and JSON outputs, the ratios and the cost plot.

:func:`machine_info` records the date, CPU, GPU, versions and load; :func:`render_markdown` writes the comparison
table under the header that every report starts with (date, machine, load, versions, the exact command), and
:func:`finish_report` the sweep and profile reports under the same header; :func:`add_ratios` adds baseline / bundle
network ratios to the comparison's rows; :func:`plot_costs` draws latency and whole-volume time against GFLOPs;
:func:`write_outputs` writes the Markdown (``--out``) and the JSON with every raw figure (``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import log
from bench.registry import Entry


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the CPU features that decide which kernels oneDNN and the BLAS use (the report lists those present)
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


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
        cpu=_cpu_model(), cpu_flags=_cpu_flags(), logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
        gpu=gpu, device=str(device), torch=torch.__version__, monai=monai.__version__, medseg_nets=medseg_version,
        python=platform.python_version(), platform=platform.platform(), load_start=loadavg(),
    )


def loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def fmt_shape(entry_shape: Sequence[int]) -> str:
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
        *(["- CPU fast-path layers off: plain PyTorch layers (`--plain-layers`)"] if meta.get("plain_layers") else []),
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
            lines.append(f"- Whole volume ({e.bundle}): {inf}roi_size={fmt_shape(e.roi)}, overlap={e.overlap}, "
                         f"mode={e.mode}, sw_batch_size={e.sw_batch_size}) on a random {fmt_shape(e.volume)} volume "
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
            f"| {r['bundle']} | {name} | {fmt_shape(r['input_shape'])} | {fmt(r['params'], ',')} | "
            f"{fmt(r['gflops'], '.2f')} | "
            f"{fmt(r['latency_ms'], '.1f')} | {fmt(r['peak_mem_mib'], '.0f')} | {fmt(r['volume_s'], '.1f')} | "
            f"{fmt(r['ratio_params'], '.2f')} | {fmt(r['ratio_gflops'], '.2f')} | "
            f"{fmt(r['ratio_latency_ms'], '.2f')} | {fmt(r['ratio_peak_mem_mib'], '.2f')} | "
            f"{fmt(r['ratio_volume_s'], '.2f')} |"
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


def add_ratios(results: list[dict]) -> None:
    """ratio_<metric> = baseline / bundle network, per bundle and batch size (the bundle network's row is 1)."""
    metrics = ("params", "gflops", "latency_ms", "peak_mem_mib", "volume_s")
    refs = {(r["bundle"], r["batch"]): r for r in results if r["role"] == "bundle"}
    for r in results:
        ref = refs.get((r["bundle"], r["batch"]))
        for m in metrics:
            ok = ref is not None and r[m] is not None and ref[m] not in (None, 0)
            r[f"ratio_{m}"] = r[m] / ref[m] if ok else None


def write_outputs(opts: argparse.Namespace, markdown: str, report: dict[str, Any]) -> None:
    if opts.out or opts.json:
        from medseg_nets.utils import atomic_write_json, atomic_write_text

        if opts.out:
            atomic_write_text(opts.out, markdown)
        if opts.json:
            atomic_write_json(opts.json, report)


def finish_report(opts: argparse.Namespace, meta: dict[str, Any], t_start: float, title: str, notes: list[str],
                  sections: list[str], skipped: list[str], **payload: Any) -> dict[str, Any]:
    """Header (machine, versions, command, ``notes``), the sections, printed and written (``--out``/``--json``)
    for the sweep and profile modes; returns the report (``payload`` added to it)."""
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = loadavg()
    lines = _header_lines(meta, title) + notes
    if meta["scale"] != 1.0 or meta["roi"] or meta["volume"]:
        lines.append("- **Sizes changed** (--scale/--roi/--volume): not the bundles' real patch and volume sizes.")
    lines += [f"- skipped {s}" for s in skipped]
    markdown = "\n".join(lines) + "\n\n" + "\n".join(sections)
    print(markdown)
    report = dict(meta=meta, **payload, skipped=skipped, markdown=markdown)
    write_outputs(opts, markdown, report)
    log(f"done in {meta['wall_s']:.0f} s")
    return report


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
