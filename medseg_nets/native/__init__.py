# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Fused float32 CPU kernels for inference, compiled from ``kernels.c`` (this folder) with the system C compiler on
first use and loaded with :mod:`ctypes`.

Why: on CPU the full-resolution blocks of GLIMS are chains of memory-bound passes (depth-wise convolution with its
layout copies, group/instance norm, PReLU, residual add), each reading and writing a 50-250 MB map. The kernels
here do such a chain in fewer passes over the channels-first maps as they are:

- :func:`depthwise3d`: depth-wise ``k^3`` convolution (stride 1, 'same' zero padding ``dilation * (k // 2)``)
  straight on ``(N, C, D, H, W)`` (no channels-last copies); :func:`depthwise3d_branches` several of them on the
  same input (GLIMS's three dilations), reading it once, and optionally each output channel's group norm (one
  group per channel) and PReLU applied while it is in cache (its statistics gathered as the output is written).
- :func:`norm_act`: per-channel normalisation (instance norm, or group norm with one group per channel; biased
  variance, ``eps``), optional affine, and PReLU, of ``x`` or ``x + residual``, in one read for the statistics
  and one read-write pass, in place if asked.

They compute the same arithmetic as the PyTorch layers in a different order (statistics about a shift, the first
value of each channel, so that the variance has no cancellation; float lanes over short blocks summed in double):
outputs agree to float32 rounding (``tests/test_native.py``). Work is split over (sample, channel) planes across
``torch.get_num_threads()`` POSIX threads.

Build: ``$CC`` (else ``cc``, ``gcc`` or ``clang`` on the ``PATH``) with ``-O3 -march=native -shared -fPIC
-pthread`` (without ``-march=native`` if that fails), once per source, compiler and CPU, into
``$MEDSEG_NETS_CACHE`` (default ``$XDG_CACHE_HOME/medseg_nets`` or ``~/.cache/medseg_nets``; a temporary folder
when that is not writable); about a second. ``MEDSEG_NETS_NATIVE=0`` turns the kernels off. When they are off or
cannot be built, :func:`available` is ``False``, the reason is logged once (:func:`status`), and the layers that
use them run their PyTorch path: same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "KernelCall",
    "add_observer",
    "available",
    "depthwise3d",
    "depthwise3d_branches",
    "enabled",
    "library",
    "norm_act",
    "remove_observer",
    "set_enabled",
    "status",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS: List[str] = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_status: Optional[str] = None  # None: not tried yet
_enabled = True  # set_enabled(False): the layers take their PyTorch path (e.g. to compare in one process)


class KernelCall(NamedTuple):
    """What one kernel call computed and touched, for observers (the benchmark's traffic recorder): FLOPs (2 per
    multiply-add, as ``FlopCounterMode`` counts a convolution), bytes read (each input tensor once) and written, and
    of the bytes read those of parameters."""

    name: str
    flops: int
    bytes_read: int
    bytes_written: int
    param_bytes_read: int


_observers: List[Callable[[KernelCall], None]] = []


def add_observer(fn: Callable[[KernelCall], None]) -> None:
    """Call ``fn(KernelCall)`` after every kernel call until :func:`remove_observer`."""
    _observers.append(fn)


def remove_observer(fn: Callable[[KernelCall], None]) -> None:
    if fn in _observers:
        _observers.remove(fn)


def _report(name: str, flops: int, read: int, written: int, params: int) -> None:
    for fn in list(_observers):
        fn(KernelCall(name, int(flops), int(read), int(written), int(params)))


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (``-march=native`` builds for this CPU only)."""
    found = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    lines = [f"{k}:{v}" for k, v in sorted(found.items())]
    return "|".join(lines) or f"{platform.machine()}|{platform.processor()}"


def _cache_root() -> Path:
    env = os.environ.get("MEDSEG_NETS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medseg_nets"


def _compile(cc: str, flags: List[str], target: Path) -> Optional[str]:
    """Compile into ``target`` atomically (temporary file, then rename); returns the error text or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=str(target.parent))
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300, check=False
        )
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit code {proc.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C compiler {cc} does not run: {e}") from e
    errors: List[str] = []
    for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
        key = hashlib.sha256(
            "\n".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_signature()]).encode()
        ).hexdigest()[:16]
        for root in (_cache_root(), Path(tempfile.gettempdir()) / f"medseg_nets-{os.getuid()}"):
            target = root / "native" / f"kernels-{key}.so"
            try:
                if not target.is_file():
                    err = _compile(cc, flags, target)
                    if err is not None:
                        errors.append(f"{cc} {' '.join(flags)}: {err}")
                        break  # a compile error does not depend on the folder
                lib = ctypes.CDLL(str(target))
                _declare(lib)
                logger.debug("native kernels: %s", target)
                return lib
            except OSError as e:  # folder not writable, or the library does not load
                errors.append(f"{target}: {e}")
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.mn_depthwise3d.restype = i32
    lib.mn_depthwise3d.argtypes = [p, p, p, p, i32, p, i64, i64, i64, i64, i64, i32, i32, p, p, p, p, f64, i32]
    lib.mn_norm_act.restype = i32
    lib.mn_norm_act.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, f64, i32]


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, built on first call; ``None`` when off or not buildable (see :func:`status`)."""
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                if os.environ.get("MEDSEG_NETS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                    _status = "off (MEDSEG_NETS_NATIVE=0)"
                else:
                    try:
                        _lib = _build()
                        _status = "on"
                    except Exception as e:  # any failure: PyTorch path, said once
                        _status = f"unavailable ({e})"
                        logger.warning("medseg_nets native CPU kernels %s; using the PyTorch layers.", _status)
    return _lib


def available() -> bool:
    """Whether the layers may use the kernels: built and loaded (built on first call) and not turned off by
    :func:`set_enabled`."""
    return _enabled and library() is not None


def set_enabled(flag: bool) -> bool:
    """Let the layers use the kernels (``True``, the default) or not, in this process; returns the previous
    setting. The kernel functions themselves stay callable."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def enabled() -> bool:
    """The setting of :func:`set_enabled` (whether or not the kernels could be built)."""
    return _enabled


def status() -> str:
    """``"on"``, ``"off (...)"`` or ``"unavailable (reason)"`` (builds the kernels on first call)."""
    library()
    return str(_status)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else int(t.data_ptr())


def _check(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a CPU torch.float32 tensor, got {t.device} {t.dtype}.")


def _check_param(t: Optional[torch.Tensor], name: str, sizes: List[int]) -> None:
    if t is not None:
        _check(t, name)
        if not t.is_contiguous() or t.numel() not in sizes:
            raise ValueError(f"{name} must be contiguous with {' or '.join(map(str, sizes))} values, got {t.shape}.")


def _lib_or_raise() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"medseg_nets native kernels are {status()}.")
    return lib


def depthwise3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    dilation: int = 1,
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation, groups=C)`` for a contiguous
    float32 ``x`` ``(N, C, D, H, W)`` and ``weight`` ``(C, 1, k, k, k)`` (``k`` odd, at most 15), without autograd;
    a new contiguous tensor."""
    return depthwise3d_branches(x, [weight], [bias], [dilation])


def depthwise3d_branches(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    dilations: Sequence[int],
    norm_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    norm_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
    prelu_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Several depth-wise convolutions of the same ``x`` (one per branch: its ``(C, 1, k, k, k)`` weight, bias or
    ``None`` and dilation; the same ``k``; at most 8 branches) concatenated along the channels, a new contiguous
    ``(N, B * C, D, H, W)`` tensor, each branch as :func:`depthwise3d`. The input is read from memory once for all
    branches.

    With ``norm_weights`` (one entry per branch; an entry, like those of ``norm_biases``, may be ``None``), each
    output channel is then normalised over its voxels (group norm with one group per channel: its mean, biased
    variance and ``eps``), scaled and shifted by the branch's norm weight and bias, and passed through PReLU with
    the branch's ``prelu_weights`` entry (1 or ``C`` slopes; ``None``: none), in place while it is still in cache:
    ``PReLU(GN(DWConv(x)))`` per branch in one kernel."""
    lib = _lib_or_raise()
    _check(x, "x")
    if x.dim() != 5 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (N, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
    n, c, d, h, w = (int(v) for v in x.shape)
    nb = len(weights)
    if not 1 <= nb <= 8 or len(biases) != nb or len(dilations) != nb:
        raise ValueError(f"1 to 8 branches, each with a weight, a bias (or None) and a dilation; got {nb}.")
    k = int(weights[0].shape[-1])
    ws, bs = [], []
    for weight, bias in zip(weights, biases):
        if tuple(weight.shape) != (c, 1, k, k, k) or k % 2 != 1 or k > 15:
            raise ValueError(f"weight must be ({c}, 1, k, k, k) with k odd (at most 15), got {tuple(weight.shape)}.")
        weight = weight.detach().contiguous()
        _check(weight, "weight")
        _check_param(bias, "bias", [c])
        ws.append(weight)
        bs.append(None if bias is None else bias.detach())
    if any(int(v) < 1 for v in dilations):
        raise ValueError(f"dilations must be >= 1, got {list(dilations)}.")
    out = x.new_empty((n, nb * c, d, h, w))
    post = norm_weights is not None
    gw: List[Optional[torch.Tensor]] = [None] * nb
    gb: List[Optional[torch.Tensor]] = [None] * nb
    ga: List[Optional[torch.Tensor]] = [None] * nb
    if post:
        for name, seq in (("norm_weights", norm_weights), ("norm_biases", norm_biases), ("prelu_weights", prelu_weights)):
            if seq is not None and len(seq) != nb:
                raise ValueError(f"{name} needs one entry per branch ({nb}), got {len(seq)}.")
        for i in range(nb):
            gw[i] = None if norm_weights[i] is None else norm_weights[i].detach()
            gb[i] = None if norm_biases is None or norm_biases[i] is None else norm_biases[i].detach()
            ga[i] = None if prelu_weights is None or prelu_weights[i] is None else prelu_weights[i].detach()
            _check_param(gw[i], "norm weight", [c])
            _check_param(gb[i], "norm bias", [c])
            _check_param(ga[i], "prelu weight", [1, c])
    w_ptrs = (ctypes.c_void_p * nb)(*[_ptr(t) for t in ws])
    b_ptrs = (ctypes.c_void_p * nb)(*[_ptr(t) for t in bs])
    dils = (ctypes.c_int * nb)(*[int(v) for v in dilations])
    with torch.profiler.record_function("medseg_nets.native.depthwise3d"):
        rc = lib.mn_depthwise3d(
            _ptr(x), w_ptrs, b_ptrs, dils, nb, _ptr(out), n, c, d, h, w, k, int(post), (ctypes.c_void_p * nb)(*[_ptr(t) for t in gw]),
            (ctypes.c_void_p * nb)(*[_ptr(t) for t in gb]), (ctypes.c_void_p * nb)(*[_ptr(t) for t in ga]),
            (ctypes.c_int64 * nb)(*[0 if t is None else int(t.numel()) for t in ga]), float(eps),
            torch.get_num_threads(),
        )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"mn_depthwise3d failed (code {rc}).")
    if _observers:
        params = _nbytes(*ws, *bs, *gw, *gb, *ga)
        _report("depthwise3d", 2 * k**3 * x.numel() * nb, _nbytes(x) + params, _nbytes(out), params)
    return out


def norm_act(
    x: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    prelu_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.prelu(F.group_norm(x + residual, C, weight, bias, eps), prelu_weight)`` for a contiguous float32 ``x``
    ``(N, C, *spatial)`` (= instance norm with ``weight``/``bias`` as its affine), without autograd.

    ``residual``: optional, shaped and laid out as ``x``. ``prelu_weight``:
    one slope or ``C`` (``None``: no activation). ``out``: the result tensor (``x`` itself for in place; default a
    new one). Returns ``out``."""
    lib = _lib_or_raise()
    _check(x, "x")
    if x.dim() < 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (N, C, ...) tensor, got shape {tuple(x.shape)}.")
    n, c = int(x.shape[0]), int(x.shape[1])
    spatial = x.numel() // max(n * c, 1)
    if residual is not None:
        _check(residual, "residual")
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(f"residual must be contiguous {tuple(x.shape)}, got {tuple(residual.shape)}.")
    _check_param(weight, "weight", [c])
    _check_param(bias, "bias", [c])
    _check_param(prelu_weight, "prelu_weight", [1, c])
    if out is None:
        out = torch.empty_like(x)
    _check(out, "out")
    if out.shape != x.shape or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(x.shape)}, got {tuple(out.shape)}.")
    alpha = None if prelu_weight is None else prelu_weight.detach()
    with torch.profiler.record_function("medseg_nets.native.norm_act"):
        lib.mn_norm_act(
            _ptr(x), _ptr(residual), _ptr(out),
            _ptr(None if weight is None else weight.detach()), _ptr(None if bias is None else bias.detach()),
            _ptr(alpha), 0 if alpha is None else int(alpha.numel()), n, c, spatial, float(eps),
            torch.get_num_threads(),
        )  # fmt: skip
    if _observers:
        params = _nbytes(weight, bias, alpha)
        _report("norm_act", 0, _nbytes(x, residual) + params, _nbytes(out), params)
    return out
