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
command; optionally a JSON file with every raw figure (``--json``) and a plot of time against GFLOPs (``--plot``).
``--sweep``, ``--profile``, ``--cases`` and ``--runtimes`` write their own report, under the same header, instead of
the table:

- ``--cases``: issue 16's table in one command: the machine's peaks (fp32 matmul, dense 3x3x3 Conv3d GFLOP/s), each
  network at its bundle's patch size (GFLOPs, latency, GFLOP/s and share of the conv peak; GLIMS beside MONAI
  SwinUNETR(48) in the same run) and each BraTS bundle's own ``configs/inference.json`` on a whole synthetic
  BraTS-like case (4 x 240 x 240 x 155, zero outside a 138 x 169 x 138 brain; made once, cached under
  ``--case-dir``) by ``python -m monai.bundle run`` in a fresh process on ``--threads`` threads: wall time, peak
  resident set, the prediction's shape checked; then the issue's goals, pass or fail (``tools/bench/cases.py``);
- ``--runtimes eager,ort,ov,compile``: the bundle's network under eager PyTorch, ONNX Runtime and OpenVINO (through
  ``medseg_nets.runtime.RuntimeNetwork``) and torch.compile, timed interleaved, with each output's difference from
  eager (``tools/bench/runtimes.py``).

Both measure as the bundles run: on the CPU, glibc malloc keeping freed memory (``--keep-freed-memory`` implied).

Usage:
    python tools/benchmark.py --bundle dalight3d                       # CPU or CUDA, picked automatically
    python tools/benchmark.py --bundle dalight3d --device cuda --amp --repeats 20 --out bench.md --json bench.json
    python tools/benchmark.py --all --fallback-nets                    # every entry, one table
    python tools/benchmark.py --bundle dalight3d --scale 0.25 --repeats 1 --skip-volume   # a quick tiny run
    python tools/benchmark.py --bundle glims --profile                 # time by kind of layer and by operator
    python tools/benchmark.py --bundle glims --sweep                   # whole volume under other inference settings
    python tools/benchmark.py --bundle glims --keep-freed-memory       # CPU allocator as the bundles' configs set it
    python tools/benchmark.py --cases --threads 2 --out build/benchmark_cases.md --json build/benchmark_cases.json
    python tools/benchmark.py --cases --threads 2 --scale 0.2 --repeats 1      # the same, tiny (a minute), to try it
    python tools/benchmark.py --runtimes eager,ort,ov --bundle glims --threads 2          # GLIMS 1x4x96^3
    python tools/benchmark.py --runtimes eager,ov --bundle glims --baselines SwinUNETR --threads 2   # and SwinUNETR
    python tools/benchmark.py --runtimes eager,ort,ov --bundle emcad --batch 32 --threads 2         # 32x4x256^2

CPU is slow: with 2 cores a 64^3 sliding window over 240x240x155 (196 windows) takes minutes per model. Use
``--skip-volume`` to leave the whole-volume column out, ``--baselines`` to run a subset, and ``--threads`` to fix
the number of intra-op threads (``torch.set_num_threads``).

Adding a bundle: add an entry to ``BUNDLES`` in ``tools/bench/registry.py`` (and, if it needs one, a baseline
factory to ``BASELINES`` there). An entry whose ``bundles/<name>`` folder does not exist yet is skipped with a message;
with ``--fallback-nets`` its network is instantiated directly from ``medseg_nets.nets`` with the documented defaults of
the entry's ``fallback`` instead (the table then says so).

This file is the command line; the code that measures, times, reads memory, sweeps, profiles and writes the reports
lives in the package ``tools/bench/``, one concern a module (``tools/bench/__init__.py`` lists them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package, when imported from elsewhere

from bench.cases import CASE_BUNDLES, run_cases  # noqa: E402
from bench.common import ROOT, log  # noqa: E402
from bench.measure import run_comparison  # noqa: E402
from bench.memory import memory_worker  # noqa: E402
from bench.profile import run_profile  # noqa: E402
from bench.registry import BASELINES, BUNDLES, SkipEntry, resolve_entry  # noqa: E402
from bench.report import machine_info  # noqa: E402
from bench.runtimes import parse_runtimes, run_runtimes  # noqa: E402
from bench.sweep import run_sweep  # noqa: E402
from medseg_nets.utils import keep_freed_memory  # noqa: E402


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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="instead of the comparison: whole-volume time of each bundle network under other inference "
                           "settings (sliding-window batch, inference_mode, channels-last, AMP) and how much each "
                           "changes the output")
    mode.add_argument("--cases", action="store_true",
                      help="instead of the comparison: issue 16's table (machine peaks; GFLOPs, latency, GFLOP/s per "
                           "patch of GLIMS, SwinUNETR(48), DALight-3D, EMCAD; a whole synthetic BraTS case through "
                           "each BraTS bundle's inference.json in a fresh process) and its goals; CPU only; "
                           f"--bundle picks among {', '.join(CASE_BUNDLES)} (default: all three)")
    mode.add_argument("--runtimes", default=None, metavar="LIST",
                      help="instead of the comparison: time each bundle network (and the --baselines named) under "
                           "these runtimes, interleaved: comma-separated among eager, ort (ONNX Runtime), ov "
                           "(OpenVINO), compile (torch.compile), plain (eager with the CPU fast-path layers off), "
                           "nonative (eager with medseg_nets.native's fused kernels off), "
                           "float64 (eager in double precision); CPU only")
    mode.add_argument("--profile", action="store_true",
                      help="instead of the table: where one forward of each bundle's network spends its time, by "
                           "kind of layer (forward hooks) and by operator (torch.profiler)")
    p.add_argument("--batch", type=int, default=1, help="--runtimes: batch size of the input (e.g. 32: EMCAD's "
                                                        "SliceInferer batch)")
    p.add_argument("--case-dir", default=str(ROOT / "build" / "bench_case"),
                   help="--cases: where the synthetic case (cached, reused), the random-weight checkpoints, the "
                        "predictions and the runs' logs go")
    p.add_argument("--case-repeats", type=int, default=1, help="--cases: runs of each bundle on the whole case "
                                                               "(median wall time)")
    p.add_argument("--case-timeout", type=float, default=3600.0,
                   help="--cases: seconds after which a whole-case run is killed")
    p.add_argument("--case-seed", type=int, default=0, help="--cases: seed of the synthetic case")
    p.add_argument("--case-runtime", default="eager", choices=("eager", "openvino", "onnxruntime"),
                   help="--cases: run the bundles' whole cases with `--runtime NAME` (their inference.json switch); "
                        "a first run pays the export and is reported apart")
    p.add_argument("--sweep-batches", default="1,2,4,8,16",
                   help="sliding-window batch sizes tried by --sweep besides the bundle's own (comma-separated)")
    p.add_argument("--sweep-no-amp", action="store_true",
                   help="leave the autocast variants out of --sweep (bfloat16 autocast is slow on CPUs without "
                        "native bfloat16)")
    p.add_argument("--plain-layers", "--plain-depthwise", dest="plain_layers", action="store_true",
                   help="run the layers with a CPU fast path (DepthwiseConv3d, PointwiseConv3d, InstanceNorm3d, GLIMS's "
                        "fused DACB branches) as the plain PyTorch layers, to compare (--plain-depthwise: its old "
                        "name)")
    p.add_argument("--plot", default=None,
                   help="also draw a PNG of latency and whole-volume time against GFLOPs for every model measured")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    p.add_argument("--json", default=None, help="write every raw figure here")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker is None and not args.bundle and not args.all and not args.cases:
        p.error("give --bundle NAME or --all")
    args.sweep_batches = tuple(int(b) for b in args.sweep_batches.split(",") if b.strip())
    if args.repeats < 1 or args.volume_repeats < 1 or args.warmup < 0:
        p.error("--repeats and --volume-repeats must be >= 1, --warmup >= 0")
    if args.cases or args.runtimes is not None:
        name = "--cases" if args.cases else "--runtimes"
        if args.device == "cuda":
            p.error(f"{name} measures the CPU (issue 16's goals are on 2 CPU threads); leave --device out")
        args.device = "cpu"
        args.keep_freed_memory = True  # as the bundles run (their configs' initialize)
        if args.amp:
            p.error(f"{name} measures float32, as the bundles run on the CPU; leave --amp out")
    if args.cases:
        wrong = sorted(set(args.bundle or []) - set(CASE_BUNDLES))
        if wrong:
            p.error(f"--cases runs the BraTS bundles {', '.join(CASE_BUNDLES)}; not {', '.join(wrong)}")
        if args.roi or args.volume:
            p.error("--cases uses each bundle's own patch size and the BraTS case size (--scale shrinks both)")
        if args.case_repeats < 1 or args.case_timeout <= 0:
            p.error("--case-repeats must be >= 1, --case-timeout > 0")
    if args.runtimes is not None:
        try:
            args.runtimes_list = parse_runtimes(args.runtimes)
        except ValueError as e:
            p.error(f"--runtimes: {e}")
        if args.batch < 1:
            p.error("--batch must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.memory_worker is not None:
        memory_worker(opts.memory_worker)
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

    if opts.cases:
        bundles = [b for b in CASE_BUNDLES if not opts.bundle or b in opts.bundle]
        meta = machine_info(device)
        meta.update(command="python tools/benchmark.py " + shlex.join(argv), amp=False, repeats=opts.repeats,
                    warmup=opts.warmup, scale=opts.scale, roi=None, volume=None,
                    keep_freed_memory=opts.keep_freed_memory, plain_layers=opts.plain_layers)
        return run_cases(bundles, opts, meta)

    roi = [int(v) for v in opts.roi.split(",")] if opts.roi else None
    volume = [int(v) for v in opts.volume.split(",")] if opts.volume else None
    names = list(BUNDLES) if opts.all else list(dict.fromkeys(opts.bundle))
    if opts.runtimes is not None and baselines is None:
        baselines = []  # --runtimes: the bundles' networks alone, unless --baselines names some
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
                keep_freed_memory=opts.keep_freed_memory, plain_layers=opts.plain_layers)
    if opts.sweep:
        return run_sweep(entries, skipped, device, opts, meta)
    if opts.profile:
        return run_profile(entries, skipped, device, opts, meta)
    if opts.runtimes is not None:
        return run_runtimes(entries, skipped, opts, meta)
    return run_comparison(entries, skipped, device, opts, meta)


if __name__ == "__main__":
    main()
