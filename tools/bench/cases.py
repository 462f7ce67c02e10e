"""The issue-16 table (``--cases``): machine peaks, cost per patch and whole BraTS-like cases through the bundles.

One command measures, in this order:

1. the synthetic case (:mod:`bench.case_data`), made once and cached under ``--case-dir`` (``build/bench_case``);
2. the machine's peaks at ``--threads`` (:mod:`bench.peaks`): fp32 matmul and dense 3x3x3 ``Conv3d`` GFLOP/s, memory
   bandwidth (copy and triad) GB/s;
3. per network at its bundle's patch size (:func:`measure_patches`): GLIMS, MONAI SwinUNETR (feature size 48, the
   GLIMS entry's baseline), DALight-3D and EMCAD (one 2D slice): GFLOPs (``FlopCounterMode``), the bytes its op
   sequence moves and its roofline time at the machine's peaks (:mod:`bench.traffic`, one recorded forward), the
   median forward latency (all networks timed interleaved, round after round, so that a change of load hits them
   alike), GFLOP/s and its share of the conv peak, latency / roofline, and the SwinUNETR / GLIMS latency ratio;
4. per BraTS bundle (:func:`run_whole_case`): ``python -m monai.bundle run`` of the bundle's own
   ``configs/inference.json`` on the case, in its native layout, in a fresh process with ``OMP_NUM_THREADS`` etc. set
   to ``--threads`` and a checkpoint of random weights of the bundle's ``network_def`` (no trained weights exist):
   wall time of the whole command (start-up, reading, preprocessing, sliding window, inversion, writing), peak
   resident set of the run's largest process (``os.wait4``'s resource usage of that one child and the processes it
   waited for, e.g. DataLoader workers: the largest of them, not their sum), CPU time, and a check that the
   prediction was written with the input's spatial shape;
5. the goals of issue 16 (:func:`evaluate_goals`), pass or fail with the figure, and for each whole-case goal the
   floor (:func:`case_floor`): the run's own start-up (wall - evaluator time) + the number of sliding windows the
   bundle's inferer takes on the cropped case x the per-window roofline of its network; a target below its floor
   cannot be met with today's op sequence and window settings even at the machine's peaks.

The random full-field volume through the inferer alone (what ``python tools/benchmark.py --all`` reports as "Whole
volume s") stays in the default mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from bench.case_data import CaseFiles, cached_case
from bench.common import ROOT, log, short
from bench.peaks import count_gflops, machine_peaks
from bench.registry import Entry, FirstOutput, ModelSpec, resolve_entry
from bench.report import finish_report, fmt, fmt_shape
from bench.traffic import forward_roofline
from medseg_nets.blocks.depthwise import set_cpu_fast_path

#: the BraTS bundles run on the whole case, in the table's order
CASE_BUNDLES = ("glims", "dalight3d", "emcad")
#: issue 16's goals: whole case on GOAL_THREADS threads within these seconds; GLIMS this many times faster per patch
CASE_GOALS_S = {"dalight3d": 60.0, "glims": 90.0, "emcad": 10.0}
PATCH_RATIO_GOAL = 3.0
GOAL_THREADS = 2
SWIN = "SwinUNETR"
SWIN_MIN_ROI = 64
#: environment variables that fix the number of threads of the child's OpenMP / BLAS libraries
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# --------------------------------------------------------------------------------------------------------------------
# per patch
# --------------------------------------------------------------------------------------------------------------------
def _bundle_network_def(bundle: str) -> dict[str, Any]:
    cfg = json.loads((ROOT / "bundles" / bundle / "configs" / "inference.json").read_text())
    return cfg.get("network_def", {})


def network_label(bundle: str, spec: ModelSpec) -> str:
    """The table's name of a network: the paper's name of a bundle's network, ``SwinUNETR(48), same run``."""
    if spec.role == "baseline":
        return "SwinUNETR(48), same run" if spec.name == SWIN else f"{spec.name}, same run"
    if bundle == "glims":
        return "GLIMS"
    if bundle == "dalight3d":
        return "DALight-3D"
    if bundle == "emcad":
        encoder = str(_bundle_network_def(bundle).get("encoder", ""))
        return f"EMCAD-{encoder.rsplit('_', 1)[-1].upper()} (slices)" if encoder else "EMCAD (slices)"
    return spec.name


def case_entry(bundle: str, scale: float = 1.0, with_swin: bool = False) -> Entry:
    """The registry entry of ``bundle`` at ``scale`` (its network only, or with SwinUNETR for GLIMS). Scaled down,
    the GLIMS patch stays at least ``SWIN_MIN_ROI`` a side (SwinUNETR's instance norm needs more than one voxel at
    its 1/32 bottleneck), for the two to be compared on the same patch."""
    entry = resolve_entry(bundle, False, [SWIN] if with_swin else [], scale)
    if bundle == "glims" and min(entry.roi) < SWIN_MIN_ROI:
        entry = resolve_entry(bundle, False, [SWIN] if with_swin else [], scale,
                              roi_override=[max(r, SWIN_MIN_ROI) for r in entry.roi])
    return entry


def patch_entries(bundles: Sequence[str], scale: float = 1.0) -> list[tuple[str, Entry, ModelSpec]]:
    """(label, entry, model) of each network of the table: each bundle's network and, beside GLIMS, SwinUNETR(48)."""
    out = []
    for bundle in bundles:
        entry = case_entry(bundle, scale, with_swin=bundle == "glims")
        for spec in entry.models:
            out.append((network_label(bundle, spec), entry, spec))
    return out


def patch_text(roi: Sequence[int]) -> str:
    """``96^3``, ``256^2``, or ``AxBxC`` when the sides differ."""
    roi = list(roi)
    return f"{roi[0]}^{len(roi)}" if len(set(roi)) == 1 else fmt_shape(roi)


def measure_patches(bundles: Sequence[str], opts: argparse.Namespace, conv_peak: Optional[float],
                    peaks: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """GFLOPs and forward latency of each network of :func:`patch_entries` at its bundle's patch size (batch 1,
    random weights and input, ``torch.inference_mode``), and with ``peaks`` (:func:`bench.peaks.machine_peaks`) the
    traffic and roofline of one forward (:func:`bench.traffic.forward_roofline`). Every network is built first;
    after the FLOP-counting pass, the traffic pass and ``--warmup`` more, the ``--repeats`` timed forwards go round
    the networks in turn (interleaved)."""
    rows, live = [], []
    for label, entry, spec in patch_entries(bundles, opts.scale):
        shape = [1, entry.in_channels, *entry.roi]
        row: dict[str, Any] = dict(network=label, bundle=entry.bundle, model=spec.name, role=spec.role,
                                   description=spec.description, input_shape=shape, patch=patch_text(entry.roi),
                                   params=None, gflops=None, latency_s=None, latencies_s=[], gflops_per_s=None,
                                   conv_peak_fraction=None, gb_moved=None, roofline_s=None,
                                   memory_bound_share=None, latency_over_roofline=None, traffic=None, errors=[])
        rows.append(row)
        try:
            torch.manual_seed(0)
            model = FirstOutput(spec.build()).eval()
            set_cpu_fast_path(model, not opts.plain_layers)
            row["params"] = sum(p.numel() for p in model.parameters())
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                row["gflops"] = count_gflops(model, x)  # also the first warm-up
                for _ in range(opts.warmup):
                    model(x)
            live.append((row, model, x))
            log(f"  {label}: {row['params']:,} params, {row['gflops']:.2f} GFLOPs at {fmt_shape(shape)}")
        except Exception as e:  # noqa: BLE001 - the row says so; the others go on
            row["errors"].append(f"{type(e).__name__}: {short(e)}")
            log(f"  {label}: failed: {short(e)}")
            continue
        if peaks is None:
            continue
        try:
            traffic = forward_roofline(model, x, peaks, batch=max(1, int(entry.sw_batch_size)))
            row.update(traffic=traffic, gb_moved=traffic["gb_moved"], roofline_s=traffic["roofline_s"],
                       memory_bound_share=traffic["memory_bound_share"])
            log(f"  {label}: {traffic['gb_moved']:.2f} GB moved by {traffic['ops']} ops, roofline "
                f"{traffic['roofline_s']:.3f} s ({100 * traffic['memory_bound_share']:.0f}% memory-bound)")
        except Exception as e:  # noqa: BLE001 - the row says so; latency is still measured
            row["errors"].append(f"traffic: {type(e).__name__}: {short(e)}")
            log(f"  {label}: traffic count failed: {short(e)}")
    with torch.inference_mode():
        for rep in range(opts.repeats):
            for row, model, x in live:
                t0 = time.perf_counter()
                model(x)
                row["latencies_s"].append(time.perf_counter() - t0)
            log(f"  round {rep + 1}/{opts.repeats}: " + ", ".join(f"{r['network']} {r['latencies_s'][-1]:.2f} s"
                                                                  for r, _, _ in live))
    for row, _, _ in live:
        row["latency_s"] = statistics.median(row["latencies_s"])
        row["gflops_per_s"] = row["gflops"] / row["latency_s"]
        if conv_peak:
            row["conv_peak_fraction"] = row["gflops_per_s"] / conv_peak
        if row["roofline_s"]:
            row["latency_over_roofline"] = row["latency_s"] / row["roofline_s"]
    return rows


def _swin_over_glims(rows: Sequence[dict[str, Any]], glims_key: str) -> Optional[float]:
    """SwinUNETR's median patch latency / GLIMS's ``glims_key`` figure (its row in the GLIMS entry), or None if
    either is missing."""
    glims = next((r for r in rows if r["bundle"] == "glims" and r["role"] == "bundle"), None)
    swin = next((r for r in rows if r["bundle"] == "glims" and r["model"] == SWIN), None)
    if not glims or not swin or not glims.get(glims_key) or not swin.get("latency_s"):
        return None
    return swin["latency_s"] / glims[glims_key]


def swin_glims_ratio(rows: Sequence[dict[str, Any]]) -> Optional[float]:
    """SwinUNETR's median patch latency / GLIMS's (> 1: GLIMS is faster), or None if either is missing."""
    return _swin_over_glims(rows, "latency_s")


# --------------------------------------------------------------------------------------------------------------------
# whole case
# --------------------------------------------------------------------------------------------------------------------
def child_env(threads: int, cpu_only: bool = True, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a whole-case run: ``threads`` for every OpenMP/BLAS library, no CUDA device when
    ``cpu_only`` (the bundles pick CUDA when they see one), warnings off, the repository importable."""
    env = dict(os.environ if base is None else base)
    env.update({v: str(threads) for v in THREAD_VARS})
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def bundle_command(bundle: str, dataset_dir: Path, ckpt: Path, out_dir: Path,
                   roi: Optional[Sequence[int]] = None, python: str = sys.executable,
                   runtime: Optional[str] = None) -> list[str]:
    """``python -m monai.bundle run`` of ``bundles/<bundle>/configs/inference.json`` (with its metadata and logging
    files) on ``dataset_dir``, writing to ``out_dir``; ``roi`` overrides the config's ``roi_size`` (``--scale``),
    ``runtime`` its ``runtime`` (``--case-runtime``; the default ``eager`` adds nothing)."""
    cfg = ROOT / "bundles" / bundle / "configs"
    cmd = [python, "-m", "monai.bundle", "run", "--config_file", str(cfg / "inference.json")]
    if (cfg / "metadata.json").is_file():
        cmd += ["--meta_file", str(cfg / "metadata.json")]
    if (cfg / "logging.conf").is_file():
        cmd += ["--logging_file", str(cfg / "logging.conf")]
    cmd += ["--bundle_root", str(ROOT / "bundles" / bundle), "--dataset_dir", str(dataset_dir),
            "--ckpt_path", str(ckpt), "--output_dir", str(out_dir)]
    if roi is not None:
        cmd += ["--roi_size", "[" + ",".join(str(int(r)) for r in roi) + "]"]
    if runtime and runtime != "eager":
        cmd += ["--runtime", runtime]
    return cmd


_RUNTIME_RAN = re.compile(r"RuntimeNetwork: (\w+) runs ")
_RUNTIME_CHECK = re.compile(r"RuntimeNetwork: \w+ output within (\S+) x range")
_RUNTIME_OFF = re.compile(r"RuntimeNetwork: \w+ unavailable, running \w+ in eager PyTorch: (.*)")


def runtime_from_log(log_text: str) -> dict[str, Any]:
    """What ``medseg_nets.runtime.RuntimeNetwork`` logged in a run: the runtime that ran the network (``eager``
    when none did or it was turned off), its check against eager PyTorch (fraction of the output range) and why it
    was turned off, if it was."""
    ran = _RUNTIME_RAN.findall(log_text)
    off = _RUNTIME_OFF.findall(log_text)
    checks = [float(v) for v in _RUNTIME_CHECK.findall(log_text)]
    return dict(runtime=ran[-1] if ran and not off else "eager", diff_over_range=max(checks) if checks else None,
                turned_off=off[-1].strip() if off else None)


def clear_runtime_cache(ckpt: Path) -> list[str]:
    """Remove the exports ``RuntimeNetwork`` cached beside ``ckpt`` (``<ckpt>.<shape>.onnx`` and its ``.json``), so
    that a first run pays the export as a user's first run does; returns the names removed."""
    removed = []
    for path in sorted(ckpt.parent.glob(f"{ckpt.name}.*")):
        if path.suffix in (".onnx", ".json"):
            path.unlink()
            removed.append(path.name)
    return removed


#: the small process between this one and a whole-case run (see :func:`run_child`): starts the command, waits for it
#: with ``os.wait4`` and writes its exit status, wall time, peak resident set and CPU time as JSON to ``argv[1]``
_LAUNCHER = r"""
import json, os, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[3:]
t0 = time.perf_counter()
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
proc.returncode = os.waitstatus_to_exitcode(status)
kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
with open(out, "w") as f:
    json.dump(dict(returncode=proc.returncode, wall_s=wall, peak_rss_kib=kib,
                   cpu_s=usage.ru_utime + usage.ru_stime), f)
"""


def run_child(cmd: Sequence[str], env: dict[str, str], log_path: Path, timeout: float, cwd: Path = ROOT
              ) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process, output to ``log_path``: its exit code, wall time from start to exit, peak
    resident set (MiB) of the process or of the largest process it waited for (e.g. DataLoader workers), and CPU time
    (user + system, its own and its waited-for processes'), from ``os.wait4`` of that very process.

    The command is started by a small launcher process (``_LAUNCHER``), not from here: Linux counts the memory of
    the process image an ``exec`` replaces in the new program's peak resident set, and this process holds the
    networks of the per-patch measurements (gigabytes), which would then be every run's "peak". (The same makes
    ``getrusage(RUSAGE_CHILDREN)`` of this process useless, besides its being a maximum over all children so far.)
    Past ``timeout`` seconds the launcher's process group, which holds the command, is killed (``timed_out``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = log_path.with_suffix(".rusage.json")
    if result.exists():
        result.unlink()
    fired = False
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(result), "--", *cmd], env=env, cwd=str(cwd),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            fired = True
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group: the launcher and the command it started
            proc.wait()
    if fired or not result.is_file():
        return dict(returncode=proc.returncode if not fired else None, wall_s=None, peak_rss_mib=None, cpu_s=None,
                    timed_out=fired)
    usage = json.loads(result.read_text())
    return dict(returncode=usage["returncode"], wall_s=usage["wall_s"], peak_rss_mib=usage["peak_rss_kib"] / 1024,
                cpu_s=usage["cpu_s"], timed_out=False)


def check_prediction(out_dir: Path, spatial_shape: Sequence[int]) -> dict[str, Any]:
    """The one ``.nii.gz`` prediction in ``out_dir``: its path, shape and dtype (header only), and ``ok`` when it has
    the input's spatial shape."""
    import nibabel as nib

    found = sorted(p for p in Path(out_dir).rglob("*.nii*") if p.is_file())
    res: dict[str, Any] = dict(path=None, shape=None, dtype=None, ok=False, error=None)
    if len(found) != 1:
        res["error"] = f"expected one prediction in {out_dir}, found {len(found)}: {[p.name for p in found][:5]}"
        return res
    img = nib.load(str(found[0]))
    res.update(path=str(found[0]), shape=[int(s) for s in img.shape], dtype=str(img.get_data_dtype()))
    res["ok"] = list(img.shape) == [int(s) for s in spatial_shape]
    if not res["ok"]:
        res["error"] = f"prediction shape {res['shape']} is not the input's {list(spatial_shape)}"
    return res


def random_checkpoint(spec: ModelSpec, path: Path, seed: int = 0) -> Path:
    """A state dict of random weights (seed ``seed``) of ``spec``'s network (the bundle's ``network_def``), which the
    bundles' ``CheckpointLoader`` accepts as ``--ckpt_path``."""
    torch.manual_seed(seed)
    net = spec.build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    del net
    return path


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _logged_run(cmd: Sequence[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """:func:`run_child` and what its log says: the log's path, the evaluator's seconds (:func:`engine_seconds`) and
    the runtime that ran the network (:func:`runtime_from_log`)."""
    run = run_child(cmd, env, log_path, timeout)
    text = log_path.read_text(errors="replace")
    run.update(log=str(log_path), engine_s=engine_seconds(text), **runtime_from_log(text))
    return run


def run_whole_case(entry: Entry, case: CaseFiles, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--case-repeats`` runs of the bundle's inference on the case (:func:`run_child`), each in a fresh process
    with a fresh output folder; the median wall time, the largest peak resident set."""
    import shutil

    bundle = entry.bundle
    spec = next(m for m in entry.models if m.role == "bundle")
    dataset_dir, layout = case.input_for(bundle)
    ckpt = random_checkpoint(spec, work / "weights" / f"{bundle}_random_seed0.pt")
    roi = list(entry.roi) if opts.scale != 1.0 else None
    out_dir = work / "out" / bundle
    runtime = getattr(opts, "case_runtime", "eager") or "eager"
    cmd = bundle_command(bundle, dataset_dir, ckpt, out_dir, roi, runtime=runtime)
    env = child_env(opts.threads_used)
    field = case.info["field"]
    row: dict[str, Any] = dict(bundle=bundle, layout=layout, dataset_dir=str(dataset_dir), command=shlex.join(cmd),
                               env={v: env[v] for v in (*THREAD_VARS, "CUDA_VISIBLE_DEVICES")},
                               roi_override=roi, runs=[], wall_s=None, engine_s=None, peak_rss_mib=None,
                               cpu_s=None, prediction=None, ok=False, errors=[], runtime_requested=runtime,
                               first_run=None, runtime=None)
    if runtime != "eager":
        # the export (and its check) is a one-off cost of a user's first run: measured apart, not in the median
        clear_runtime_cache(ckpt)
        log_path = work / "logs" / f"{bundle}_first_run.log"
        log(f"  {bundle}: whole case, first run with --runtime {runtime} (export): {shlex.join(cmd)}")
        first = _logged_run(cmd, env, log_path, opts.case_timeout)
        row["first_run"] = first
        if first["timed_out"] or first["returncode"] != 0:
            row["errors"].append(f"first run: exit status {first['returncode']}; log {log_path}: "
                                 f"{_tail(log_path, 3)}")
            return row
    for rep in range(opts.case_repeats):
        if out_dir.exists():
            shutil.rmtree(out_dir)  # this tool's own output folder of the previous run
        log_path = work / "logs" / f"{bundle}_run{rep + 1}.log"
        load_before = _load1()
        log(f"  {bundle}: whole case, run {rep + 1}/{opts.case_repeats}: {shlex.join(cmd)}")
        run = _logged_run(cmd, env, log_path, opts.case_timeout)
        run.update(load_before=load_before, load_after=_load1())
        row["runs"].append(run)
        if run["timed_out"] or run["returncode"] != 0:
            what = f"timed out after {opts.case_timeout:.0f} s" if run["timed_out"] else \
                f"exit status {run['returncode']}"
            row["errors"].append(f"run {rep + 1}: {what}; log {log_path}: {_tail(log_path, 3)}")
            log(f"  {bundle}: {what}; last lines of {log_path}:\n{_tail(log_path)}")
            break
        pred = check_prediction(out_dir, field)
        row["prediction"] = pred
        if not pred["ok"]:
            row["errors"].append(f"run {rep + 1}: {pred['error']}")
            break
        log(f"  {bundle}: {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, CPU {run['cpu_s']:.1f} s, "
            f"prediction {fmt_shape(pred['shape'])} {pred['dtype']}")
    good = [r for r in row["runs"] if r["returncode"] == 0 and not r["timed_out"]]
    row["ok"] = not row["errors"] and len(good) == opts.case_repeats
    if good:
        row["wall_s"] = statistics.median(r["wall_s"] for r in good)
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in good)
        row["cpu_s"] = statistics.median(r["cpu_s"] for r in good)
        engine = [r["engine_s"] for r in good if r["engine_s"] is not None]
        row["engine_s"] = statistics.median(engine) if engine else None
        row["runtime"] = good[-1]["runtime"]
    return row


_ENGINE_TIME = re.compile(r"Engine run finished\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")


def engine_seconds(log_text: str) -> Optional[float]:
    """The evaluator's own time (ignite's last ``Engine run finished. Time taken: HH:MM:SS.fff`` line): reading,
    preprocessing, inference, postprocessing and writing, without the process's start-up, imports and workflow
    construction; None when the log has no such line."""
    found = _ENGINE_TIME.findall(log_text)
    if not found:
        return None
    h, m, sec = found[-1]
    return int(h) * 3600 + int(m) * 60 + float(sec)


def _load1() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# floors: the least a whole case can take with today's op sequence and window settings
# --------------------------------------------------------------------------------------------------------------------
def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: Any) -> int:
    """How many windows ``monai.inferers.sliding_window_inference`` takes on an image of ``image_size`` (spatial):
    the same steps and helpers (``fall_back_tuple``: a ``roi_size`` of -1 or 0 is the whole axis; the image padded to
    the roi where smaller; ``_get_scan_interval``; ``dense_patch_slices``), ``overlap`` one value or one per axis."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    dims = len(image_size)
    roi = fall_back_tuple(list(roi_size), list(image_size))
    size = tuple(max(int(i), int(r)) for i, r in zip(image_size, roi))
    scan = _get_scan_interval(size, roi, dims, ensure_tuple_rep(overlap, dims))
    return len(dense_patch_slices(size, roi, scan))


def floor_seconds(startup_s: Optional[float], windows: int, calls_per_window: int, call_roofline_s: float) -> float:
    """start-up + windows x network calls per window x roofline seconds of one call (start-up 0 when unknown)."""
    return (startup_s or 0.0) + windows * calls_per_window * call_roofline_s


def case_floor(entry: Entry, patch: Optional[dict[str, Any]], case_row: Optional[dict[str, Any]],
               cropped: Sequence[int]) -> Optional[dict[str, Any]]:
    """The floor of a bundle's whole case (None without the network's roofline): its own start-up in this run (wall
    - evaluator seconds of ``case_row``; None, counted as 0, when either is missing) + the sliding windows its
    inferer takes on the ``cropped`` case (:func:`window_count` with the entry's roi and overlap) x the roofline of
    the network's calls in a window (``patch``). A 3D network runs once per window; a slice-wise one (EMCAD:
    in-plane windows holding every slice) once per slice of the window. The network runs on batches of windows or
    slices (``sw_batch_size``, EMCAD's ``slice_batch``), which read the weights once per batch: the per-call roofline
    is the patch's at that batch (``sw_batch_roofline_s`` of :func:`bench.traffic.forward_roofline`), every batch
    counted full (a last, partial batch reads the weights once more: left out, the floor stays a lower bound)."""
    if not patch or not patch.get("roofline_s"):
        return None
    per_call = (patch.get("traffic") or {}).get("sw_batch_roofline_s") or patch["roofline_s"]
    batch = (patch.get("traffic") or {}).get("sw_batch", 1)
    cropped = [int(c) for c in cropped]
    if entry.dims == 2 and entry.slice_axis is not None:
        axis = int(entry.slice_axis)
        roi = list(entry.roi[:axis]) + [-1] + list(entry.roi[axis:])
        calls = cropped[axis]
    else:
        roi, calls = list(entry.roi), 1
    windows = window_count(cropped, roi, entry.overlap)
    startup = None
    if case_row and case_row.get("wall_s") is not None and case_row.get("engine_s") is not None:
        startup = case_row["wall_s"] - case_row["engine_s"]
    overlap = list(entry.overlap) if isinstance(entry.overlap, (list, tuple)) else entry.overlap
    network_s = floor_seconds(None, windows, calls, per_call)
    return dict(cropped=cropped, roi=roi, overlap=overlap, windows=windows, calls_per_window=calls, batch=batch,
                call_roofline_s=per_call, call_roofline_batch1_s=patch["roofline_s"], network_floor_s=network_s,
                startup_s=startup, floor_s=floor_seconds(startup, windows, calls, per_call))


def case_floors(bundles: Sequence[str], patches: Sequence[dict[str, Any]], cases: dict[str, dict[str, Any]],
                cropped: Optional[Sequence[int]], scale: float) -> dict[str, dict[str, Any]]:
    """:func:`case_floor` of each bundle with a roofline, on the case's ``cropped`` size (the foreground bounding
    box, :mod:`bench.case_data`: what ``CropForegroundd`` keeps; the case is 1 mm isotropic and the bundles' RAS
    reorientation only flips its axes, so the box's sizes are those the inferer sees)."""
    floors: dict[str, dict[str, Any]] = {}
    if cropped is None:
        return floors
    for bundle in bundles:
        patch = next((r for r in patches if r["bundle"] == bundle and r["role"] == "bundle"), None)
        floor = case_floor(case_entry(bundle, scale), patch, cases.get(bundle), cropped)
        if floor is not None:
            floors[bundle] = floor
    return floors


def swin_over_glims_roofline(rows: Sequence[dict[str, Any]]) -> Optional[float]:
    """SwinUNETR's measured patch latency / GLIMS's roofline: the most the per-patch ratio can be with GLIMS's op
    sequence run at the machine's peaks (and SwinUNETR as measured); None if either is missing."""
    return _swin_over_glims(rows, "roofline_s")


# --------------------------------------------------------------------------------------------------------------------
# goals
# --------------------------------------------------------------------------------------------------------------------
def evaluate_goals(patches: Sequence[dict[str, Any]], cases: dict[str, dict[str, Any]], threads: int,
                   scale: float, bundles: Sequence[str] = CASE_BUNDLES,
                   floors: Optional[dict[str, dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Issue 16's goals, each with its figure and ``status``: ``pass``, ``fail``, ``not measured``, or ``n/a``
    when the run is not comparable (``--scale`` other than 1 or threads other than 2: ``result`` then says what the
    figure would give). A whole case counts only with a prediction of the input's shape.

    Each goal also says whether it is reachable with today's op sequence at the machine's peaks (``unreachable``:
    True, False, or None when not known): a whole-case goal has its ``floor`` (:func:`case_floor`, from ``floors``),
    ``floor_s`` and ``below_floor`` (the target below the floor); the per-patch ratio its ``ceiling_ratio``
    (:func:`swin_over_glims_roofline`)."""
    floors = floors or {}
    comparable = scale == 1.0 and threads == GOAL_THREADS
    why = None if comparable else (f"the goals are for the full-size case on {GOAL_THREADS} threads; this run: "
                                   f"--scale {scale:g}, {threads} thread(s)")
    goals: list[dict[str, Any]] = []

    def add(key: str, goal: str, target: str, figure: Optional[str], result: Optional[bool], **extra: Any) -> None:
        status = "not measured" if result is None else ("pass" if result else "fail")
        goals.append(dict(key=key, goal=goal, target=target, figure=figure, result=status,
                          status=status if comparable or result is None else "n/a", note=why,
                          **{"unreachable": None, **extra}))

    ratio = swin_glims_ratio(patches)
    ceiling = swin_over_glims_roofline(patches)
    add("glims_vs_swinunetr", "GLIMS per-patch latency >= 3x lower than MONAI SwinUNETR(feature_size 48), same run",
        f">= {PATCH_RATIO_GOAL:g}x", None if ratio is None else f"{ratio:.2f}x",
        None if ratio is None else ratio >= PATCH_RATIO_GOAL, ceiling_ratio=ceiling,
        unreachable=None if ceiling is None else ceiling < PATCH_RATIO_GOAL)
    for bundle in ("dalight3d", "glims", "emcad"):
        limit = CASE_GOALS_S[bundle]
        goal = f"whole BraTS case through bundles/{bundle} inference.json, {GOAL_THREADS} threads"
        row = cases.get(bundle)
        floor = floors.get(bundle) if bundle in bundles else None
        below = None if floor is None else limit < floor["floor_s"]
        extra = dict(floor=floor, floor_s=None if floor is None else floor["floor_s"], below_floor=below,
                     unreachable=below)
        if row is None or bundle not in bundles:
            add(f"case_{bundle}", goal, f"<= {limit:g} s", None, None, **extra)
            continue
        if row.get("wall_s") is None or not row.get("ok"):
            figure = "failed: " + "; ".join(row.get("errors") or ["no valid prediction"])[:200]
            add(f"case_{bundle}", goal, f"<= {limit:g} s", figure, False, **extra)
            continue
        add(f"case_{bundle}", goal, f"<= {limit:g} s", f"{row['wall_s']:.1f} s", row["wall_s"] <= limit, **extra)
    measured = {b: cases[b].get("peak_rss_mib") for b in bundles if b in cases}
    if not measured:
        add("case_peak_memory", "peak memory of each whole case stated", "stated", None, None)
    else:
        figure = ", ".join(f"{b} {fmt(m, '.0f')} MiB" for b, m in measured.items())
        add("case_peak_memory", "peak memory of each whole case stated", "stated", figure,
            all(m is not None for m in measured.values()))
    return goals


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------
def _latency_text(row: dict[str, Any]) -> str:
    times = row["latencies_s"]
    if not times:
        return "—"
    med = row["latency_s"]
    spec = ".2f" if med < 10 else ".1f"
    if len(times) == 1:
        return f"{format(med, spec)} s"
    return f"{format(med, spec)} s ({format(min(times), spec)}-{format(max(times), spec)})"


def _rate_text(row: dict[str, Any]) -> str:
    if row["gflops_per_s"] is None:
        return "—"
    text = f"{row['gflops_per_s']:.0f}" if row["gflops_per_s"] >= 10 else f"{row['gflops_per_s']:.1f}"
    if row["conv_peak_fraction"] is not None:
        text += f" ({100 * row['conv_peak_fraction']:.0f}% of the conv peak)"
    return text


def _seconds_text(sec: Optional[float]) -> str:
    if sec is None:
        return "—"
    return f"{sec:.1f} s" if sec >= 10 else (f"{sec:.2f} s" if sec >= 0.1 else f"{sec * 1000:.1f} ms")


def _floor_text(goal: dict[str, Any]) -> str:
    """The goals table's floor cell: the floor (or the ratio's ceiling), how it is made, reachable or not."""
    verdict = {True: "target below it: unreachable at the peaks", False: "target above it"}
    if goal.get("ceiling_ratio") is not None:
        return (f"{goal['ceiling_ratio']:.2f}x (SwinUNETR's latency / GLIMS's roofline): "
                + {True: "target above it: unreachable at the peaks", False: "target below it"}[goal["unreachable"]])
    floor = goal.get("floor")
    if not floor:
        return "—"
    calls = f" x {floor['calls_per_window']} slices" if floor["calls_per_window"] != 1 else ""
    startup = "start-up not measured" if floor["startup_s"] is None else f"start-up {floor['startup_s']:.1f} s"
    batch = f" (in batches of {floor['batch']})" if floor.get("batch", 1) > 1 else ""
    return (f"{floor['floor_s']:.1f} s = {startup} + {floor['windows']} window(s){calls} x "
            f"{_seconds_text(floor['call_roofline_s'])}{batch}: {verdict[goal['below_floor']]}")


def _runtime_text(report: dict[str, Any]) -> str:
    runtime = report["meta"].get("case_runtime") or "eager"
    return "" if runtime == "eager" else f", with `--runtime {runtime}` (opt-in; default eager PyTorch)"


def _runtime_lines(cases: dict[str, dict[str, Any]]) -> list[str]:
    """Which runtime ran each bundle's network and its first run (the export), for ``--case-runtime``."""
    rows = [(b, c) for b, c in cases.items() if (c.get("runtime_requested") or "eager") != "eager"]
    if not rows:
        return []
    lines = ["", "Runtime (`--case-runtime`): the first run exports the network (cached beside the checkpoint) and "
                 "is not in the median above.", "",
             "| bundle | requested | ran | first run s (export) | output vs eager, of the range | turned off because |",
             "|---|---|---|---:|---:|---|"]
    for b, c in rows:
        first = c.get("first_run") or {}
        diff = c["runs"][-1].get("diff_over_range") if c["runs"] else first.get("diff_over_range")
        off = (c["runs"][-1].get("turned_off") if c["runs"] else None) or first.get("turned_off") or "—"
        lines.append(f"| {b} | {c['runtime_requested']} | {c.get('runtime') or first.get('runtime') or '—'} | "
                     f"{fmt(first.get('wall_s'), '.1f')} | {fmt(diff, '.2g')} | {off} |")
    return lines


def render_cases(report: dict[str, Any]) -> list[str]:
    """The sections of the ``--cases`` report (under the common header)."""
    peaks, patches, cases, goals, case = (report["peaks"], report["patches"], report["cases"], report["goals"],
                                          report["case"])
    field = "x".join(map(str, [case["info"]["channels"], *case["info"]["field"]])) if case else "—"
    lines = ["## Cost per patch and per whole case", "",
             f"| network (bundle's inference path) | patch | GFLOPs | latency | GFLOP/s | GB moved | roofline | "
             f"latency / roofline | whole {field} case | whole-case peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in patches:
        c = cases.get(r["bundle"]) if r["role"] == "bundle" else None
        if c is None:
            whole, mem = ("— (no bundle)" if r["role"] != "bundle" else "not run"), "—"
        elif c["wall_s"] is None or not c["ok"]:
            whole, mem = "failed (see notes)", fmt(c["peak_rss_mib"], ".0f")
        else:
            whole, mem = f"{c['wall_s']:.1f} s", f"{c['peak_rss_mib']:.0f} MiB"
        name = r["network"] + (" (failed, see notes)" if r["errors"] else "")
        gflops = "—" if r["gflops"] is None else f"{r['gflops']:.3g}"
        moved = "—" if r.get("gb_moved") is None else f"{r['gb_moved']:.3g}"
        over = "—" if r.get("latency_over_roofline") is None else f"{r['latency_over_roofline']:.1f}x"
        lines.append(f"| {name} | {r['patch']} | {gflops} | {_latency_text(r)} | {_rate_text(r)} | {moved} | "
                     f"{_seconds_text(r.get('roofline_s'))} | {over} | {whole} | {mem} |")
    ratio = swin_glims_ratio(patches)
    lines += ["",
              "GB moved: the bytes one forward's ATen ops read and write (each op's input and output tensors once; "
              "views none), `tools/bench/traffic.py`. Roofline: the time that op sequence takes at the machine's "
              "peaks below, each op at max(FLOPs / compute peak, bytes / memory peak), summed; latency / roofline "
              "is how far the forward is from it (1x: at the machine's limit).",
              "",
              "GLIMS / SwinUNETR(48) per-patch latency, same run: " + (
                  f"SwinUNETR takes {ratio:.2f}x GLIMS's time (goal >= {PATCH_RATIO_GOAL:g}x)." if ratio is not None
                  else "not measured."), ""]
    lines += ["## Goals (issue 16)", "",
              "| goal | target | measured | status | floor at the machine's peaks (today's op sequence) |",
              "|---|---|---|---|---|"]
    for g in goals:
        status = g["status"] if g["status"] != "n/a" else f"n/a (at these sizes: {g['result']})"
        lines.append(f"| {g['goal']} | {g['target']} | {g['figure'] or '—'} | {status} | {_floor_text(g)} |")
    lines += ["", "Floor of a whole case: this run's start-up of the bundle (wall - evaluator seconds) + the sliding "
                  "windows its inferer takes on the cropped case (MONAI's own window arithmetic) x the roofline of "
                  "the network's calls per window (one per window in 3D, one per slice for EMCAD; in the inferer's "
                  "batches, the weights read once a batch); a target below it cannot be met with today's op "
                  "sequence and window settings, even at the machine's peaks."]
    if any(g["status"] == "n/a" for g in goals):
        lines += ["", f"Not applicable: {next(g['note'] for g in goals if g['note'])}."]
    lines += ["", "## Machine peaks", ""]
    if peaks:
        lines += [f"At {peaks['threads']} thread(s), best of {peaks['repeats']} calls after a warm-up:", "",
                  "| kernel | GFLOPs per call | best GFLOP/s | median GFLOP/s |", "|---|---:|---:|---:|"]
        for k in [peaks["matmul"], *peaks["conv3d"]]:
            lines.append(f"| {k['what']} | {k['gflops']:.2f} | {k['best_gflops_per_s']:.1f} | "
                         f"{k['median_gflops_per_s']:.1f} |")
        lines += ["", f"Conv peak (the best dense Conv3d above): {peaks['conv3d_gflops_per_s']:.1f} GFLOP/s; fp32 "
                      f"matmul peak: {peaks['matmul_gflops_per_s']:.1f} GFLOP/s."]
        if peaks.get("memory"):
            lines += ["", "| memory kernel | GB read + written per call | best GB/s | median GB/s |",
                      "|---|---:|---:|---:|"]
            for k in peaks["memory"]:
                lines.append(f"| {k['what']} | {k['gbytes']:.3f} | {k['best_gb_per_s']:.1f} | "
                             f"{k['median_gb_per_s']:.1f} |")
            lines += ["", f"Memory peak (the faster of the two): {peaks['memory_gb_per_s']:.1f} GB/s."]
    else:
        lines.append("Not measured.")
    lines += ["", "## Per patch", "",
              f"Batch 1 at the bundle's patch size, random weights and input, torch.inference_mode; GFLOPs from "
              f"torch.utils.flop_counter.FlopCounterMode (multiply-add = 2 FLOPs); latency: median (min-max) of "
              f"{report['meta']['repeats']} forwards after {report['meta']['warmup'] + 1} warm-up(s), the networks "
              "timed in turn, round after round.", "",
              "| network | model | input | params | GFLOPs | latency s (each) |", "|---|---|---|---:|---:|---|"]
    for r in patches:
        each = ", ".join(f"{t:.3f}" for t in r["latencies_s"]) or "—"
        lines.append(f"| {r['network']} | {r['description']} | {fmt_shape(r['input_shape'])} | "
                     f"{fmt(r['params'], ',')} | {fmt(r['gflops'], '.2f')} | {each} |")
    traffic = [r for r in patches if r.get("traffic")]
    if traffic:
        lines += ["", "Roofline of one forward (`tools/bench/traffic.py`): ATen ops recorded under "
                      "torch.inference_mode, as eager PyTorch runs them (composite ops as the kernels they call); "
                      "compute at the conv peak for convolutions, the matmul peak for matrix products, memory at the "
                      "memory peak; memory-bound: the share of the roofline in ops whose bytes take longer than their "
                      "FLOPs; per input in the inferer's batch: the roofline with the parameters' bytes (GB read of "
                      "them in brackets) read once a batch; the ops that move the most bytes, with their share of the "
                      "roofline.", "",
                  "| network | ops | GB read (parameters) | GB written | roofline | compute only | memory only | "
                  "memory-bound | per input in the inferer's batch | most bytes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in traffic:
            t = r["traffic"]
            top = "; ".join(f"{o['op'].removeprefix('aten.')} x{o['calls']} {o['gb']:.3g} GB "
                            f"({100 * (o['roofline_share'] or 0):.0f}%)" for o in t["top_ops"][:5])
            lines.append(f"| {r['network']} | {t['ops']} | {t['gb_read']:.3g} ({t['param_gb_read']:.3g}) | "
                         f"{t['gb_written']:.3g} | {_seconds_text(t['roofline_s'])} | "
                         f"{_seconds_text(t['compute_s'])} | {_seconds_text(t['memory_s'])} | "
                         f"{100 * (t['memory_bound_share'] or 0):.0f}% | "
                         f"{_seconds_text(t['sw_batch_roofline_s'])} (batch {t['sw_batch']}) | {top} |")
    lines += ["", "## Whole case", ""]
    if case:
        info = case["info"]
        thread_env = ", ".join(f"{v}={report['meta']['threads_used']}" for v in THREAD_VARS)
        lines += [
            f"Case: synthetic, BraTS-like (`tools/make_demo_data.py` `make_case`, seed {info['seed']}), "
            f"{info['channels']} channels x {fmt_shape(info['field'])} voxels, zero outside a brain whose non-zero "
            f"bounding box is {fmt_shape(info['extent'])} voxels at offset {tuple(info['extent_start'])} "
            f"(generated {fmt_shape(info['generated_extent'])}, resampled to that box); "
            f"{'reused from' if case['reused'] else 'written to'} `{case['folder']}`.",
            "",
            f"Each bundle: a fresh `python -m monai.bundle run` of its `configs/inference.json` as shipped (its "
            f"preprocessing crops the foreground){_runtime_text(report)}, random weights of its `network_def` as "
            f"`--ckpt_path`, "
            f"{thread_env}, no CUDA device; wall time "
            "of the whole command (Python start-up and imports included), median of "
            f"{report['meta']['case_repeats']} run(s); peak RSS: the largest resident set among the run's processes "
            "(os.wait4 of the child); evaluator: the bundle's own engine time (from its log: reading, "
            "preprocessing, inference, postprocessing, writing; the rest of the wall time is start-up); CPU: user + "
            "system seconds.",
            "",
            "| bundle | input layout | wall s | of which evaluator s | peak RSS MiB | CPU s | prediction | "
            "load 1 min before/after |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        for b, c in cases.items():
            pred = c.get("prediction") or {}
            ptxt = (f"{fmt_shape(pred['shape'])} {pred['dtype']}" + (" (input's shape)" if pred.get("ok") else
                                                                      " (NOT the input's shape)")) \
                if pred.get("shape") else "none"
            loads = "; ".join(f"{r['load_before']}/{r['load_after']}" for r in c["runs"]) or "—"
            lines.append(f"| {b} | {c['layout']} | {fmt(c['wall_s'], '.1f')} | {fmt(c.get('engine_s'), '.1f')} | "
                         f"{fmt(c['peak_rss_mib'], '.0f')} | "
                         f"{fmt(c['cpu_s'], '.1f')} | {ptxt} | {loads} |")
        lines += _runtime_lines(cases)
        lines += ["", "Commands:", ""] + [f"- {b}: `{c['command']}`" for b, c in cases.items()]
    else:
        lines.append("Skipped (--skip-volume).")
    lines += ["", "The inferer alone on a random full-field volume (no reading, cropping or writing) is the default "
                  "mode's \"Whole volume s\": `python tools/benchmark.py --bundle glims` etc."]
    notes = [f"{r['network']}: {e}" for r in patches for e in r["errors"]]
    notes += [f"{b}: {e}" for b, c in cases.items() for e in c["errors"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return ["\n".join(lines) + "\n"]


def run_cases(bundles: Sequence[str], opts: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The whole ``--cases`` run (module doc): case, peaks, patches, whole cases, goals; the report printed and
    written (``--out``, ``--json``); returns it."""
    import nibabel
    import numpy
    import scipy

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    meta.update(threads_used=threads, case_repeats=opts.case_repeats, case_bundles=list(bundles),
                case_runtime=getattr(opts, "case_runtime", "eager") or "eager",
                versions_extra=dict(numpy=numpy.__version__, scipy=scipy.__version__, nibabel=nibabel.__version__))
    opts.threads_used = threads
    work = Path(opts.case_dir)
    case = None
    if not opts.skip_volume:
        case = cached_case(work / "data", opts.scale, opts.case_seed, log=log)
        log(f"case: {fmt_shape(case.info['field'])}, brain {fmt_shape(case.info['extent'])} "
            f"({'reused' if case.reused else 'made'}) in {case.folder}")
    log(f"machine peaks at {threads} thread(s)")
    peaks = machine_peaks(opts.scale, max(opts.repeats, 3), log=log)
    log("per patch: " + ", ".join(bundles))
    patches = measure_patches(bundles, opts, peaks["conv3d_gflops_per_s"], peaks)
    cases: dict[str, dict[str, Any]] = {}
    if case is not None:
        for bundle in bundles:
            entry = case_entry(bundle, opts.scale)
            try:
                cases[bundle] = run_whole_case(entry, case, opts, work)
            except Exception as e:  # noqa: BLE001 - e.g. the checkpoint cannot be written: say so, go on
                log(f"  {bundle}: whole case failed: {short(e)}")
                cases[bundle] = dict(bundle=bundle, layout=case.input_for(bundle)[1], command="", runs=[],
                                     wall_s=None, engine_s=None, peak_rss_mib=None, cpu_s=None, prediction=None,
                                     ok=False, errors=[f"{type(e).__name__}: {short(e)}"])
    floors = case_floors(bundles, patches, cases, case.info["extent"] if case else None, opts.scale)
    goals = evaluate_goals(patches, cases, threads, opts.scale, bundles, floors)
    report: dict[str, Any] = dict(meta=meta, peaks=peaks, patches=patches, case=case.as_dict() if case else None,
                                  cases=cases, floors=floors, goals=goals)
    notes = ["- Issue 16's table, re-measured by one command: the machine's peaks, each network per patch and each "
             "BraTS bundle on a whole synthetic case; random weights (cost, not accuracy)."]
    extra = ", ".join(f"{k} {v}" for k, v in meta["versions_extra"].items())
    notes.append(f"- Also: {extra}; CPU flags: {', '.join(meta.get('cpu_flags') or []) or 'unknown'}.")
    return finish_report(opts, meta, t_start, "# medseg-bundles: cost per patch and per whole case", notes,
                         render_cases(report), [], **{k: v for k, v in report.items() if k != "meta"})
