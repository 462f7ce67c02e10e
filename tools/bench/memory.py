"""How memory is read: peak forward memory above the model and its input.

CPU: :func:`cpu_forward_peak_rss_mib` reads the growth of the resident set during one forward (Linux ``VmHWM -
VmRSS``, the high-water mark reset through ``/proc/self/clear_refs`` just before the forward). It is honest only in a
process that has done nothing else, so :func:`cpu_memory_subprocess` runs it in a fresh Python process per model:
``tools/benchmark.py --memory-worker SPEC``, whose :func:`memory_worker` builds the one model and prints the figure
as a JSON line. CUDA: :func:`cuda_forward_peak_mib`, ``torch.cuda.max_memory_allocated`` during one forward minus
the memory allocated before it, in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from bench.common import ROOT
from bench.registry import FirstOutput, resolve_entry
from bench.timing import autocast, sync
from medseg_nets.blocks.depthwise import set_cpu_fast_path
from medseg_nets.utils import malloc_trim


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
    with torch.inference_mode(), autocast(device, amp):
        out = model(x)
    peak = _proc_status_kib("VmHWM")
    del out
    return (peak - before) / 1024.0


def cuda_forward_peak_mib(model: nn.Module, x: torch.Tensor, device: torch.device, amp: bool = False) -> float:
    """Peak CUDA memory (MiB) allocated during one forward of ``model`` on ``x`` above what was allocated before it
    (the model, its input and anything else alive)."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast(device, amp):
        out = model(x)
    sync(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del out
    return peak


def memory_worker(spec_json: str) -> None:
    """Entry point of the fresh subprocess that measures one model's CPU forward memory; prints one JSON line."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    entry = resolve_entry(spec["bundle"], spec["fallback_nets"], [spec["model"]])
    model = FirstOutput(next(m for m in entry.models if m.name == spec["model"]).build()).eval()
    set_cpu_fast_path(model, not spec.get("plain_layers", False))
    mib = cpu_forward_peak_rss_mib(model, spec["shape"], spec["amp"])
    print("MEMORY_RESULT " + json.dumps({"peak_mib": mib}), flush=True)


def cpu_memory_subprocess(spec: dict[str, Any], timeout: float = 3600) -> float:
    """:func:`cpu_forward_peak_rss_mib` of the model that ``spec`` names (the keys :func:`memory_worker` reads), in a
    fresh ``tools/benchmark.py --memory-worker`` process."""
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--memory-worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return float(json.loads(line[len("MEMORY_RESULT "):])["peak_mib"])
    raise RuntimeError(f"memory subprocess failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
