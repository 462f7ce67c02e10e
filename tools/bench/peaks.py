"""The machine's peaks (``--cases``): what this CPU computes and moves at best, at the run's number of threads.

Two compute figures put the networks' GFLOP/s in proportion: a float32 matrix product (:func:`matmul_rate`,
``torch.mm`` of square matrices: the BLAS peak) and a dense 3x3x3 ``nn.Conv3d`` with padding 1 (:func:`conv3d_rate`,
oneDNN's convolution: the ceiling for the 3D networks' main layer) at a few channel counts and sizes, the best of which
is "the conv peak". FLOPs are counted as for the networks (``torch.utils.flop_counter.FlopCounterMode``, a
multiply-add = 2), and each rate is the best of ``repeats`` timed calls after one warm-up (a peak, not a typical
figure).

One memory figure bounds what does not compute much (element-wise passes, norms, layout copies): the bandwidth of
:func:`copy_rate` (``dst.copy_(src)`` of a large float32 tensor, ``MEMORY_MIB`` at ``--scale`` 1) and of
:func:`triad_rate` (``torch.add(a, b, alpha=s, out=c)``, STREAM's triad), in GB/s (10^9 bytes) counting the bytes
read and written (2 and 3 arrays a call); the higher of the two is "the memory peak". Scaled down below the
last-level cache's size it measures the cache, not the memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

#: (channels in = out, cubic spatial size) of the dense 3x3x3 convolutions timed, at --scale 1
CONV_SHAPES = ((32, 64), (64, 48), (128, 32))
MATMUL_N = 2048
#: MiB of each float32 array of the memory-bandwidth kernels, at --scale 1; at least MEMORY_MIN_MIB scaled down
MEMORY_MIB = 256
MEMORY_MIN_MIB = 4


def count_gflops(fn, *args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops() / 1e9


def best_rate(fn, args: Sequence[Any], gflops: float, repeats: int) -> dict[str, Any]:
    """Time ``fn(*args)`` ``repeats`` times after one warm-up call: GFLOP/s of the fastest call and of the median."""
    fn(*args)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    times_sorted = sorted(times)
    median = times_sorted[len(times_sorted) // 2]
    return dict(gflops=gflops, times_s=times, best_gflops_per_s=gflops / times_sorted[0],
                median_gflops_per_s=gflops / median)


def matmul_rate(n: int = MATMUL_N, repeats: int = 5) -> dict[str, Any]:
    """float32 ``torch.mm`` of two n x n matrices."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    with torch.inference_mode():
        gflops = count_gflops(torch.mm, a, b)
        res = best_rate(torch.mm, (a, b), gflops, repeats)
    res.update(what=f"fp32 matmul {n}x{n} @ {n}x{n}")
    return res


def conv3d_rate(channels: int, size: int, repeats: int = 5) -> dict[str, Any]:
    """float32 dense ``nn.Conv3d(channels, channels, 3, padding=1)`` on a 1 x channels x size^3 input."""
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, channels, 3, padding=1).eval()
    x = torch.randn(1, channels, size, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gflops = count_gflops(conv, x)
        res = best_rate(conv, (x,), gflops, repeats)
    res.update(what=f"dense Conv3d 3x3x3, {channels}->{channels} channels, 1x{channels}x{size}^3")
    return res


def best_bandwidth(fn, args: Sequence[Any], gbytes: float, repeats: int) -> dict[str, Any]:
    """Time ``fn(*args)`` ``repeats`` times after one warm-up call: GB/s of the fastest call and of the median, for
    ``gbytes`` GB read + written a call."""
    res = best_rate(fn, args, gbytes, repeats)
    return dict(gbytes=gbytes, times_s=res["times_s"], best_gb_per_s=res["best_gflops_per_s"],
                median_gb_per_s=res["median_gflops_per_s"])


def _arrays(mib: float, count: int) -> list[torch.Tensor]:
    n = max(1, int(mib * 2**20) // 4)
    return [torch.full((n,), float(i + 1)) for i in range(count)]  # written: the pages are resident before timing


def copy_rate(mib: float = MEMORY_MIB, repeats: int = 5) -> dict[str, Any]:
    """``dst.copy_(src)`` of two contiguous float32 tensors of ``mib`` MiB: 2 x ``mib`` MiB moved a call (read src,
    write dst)."""
    src, dst = _arrays(mib, 2)
    with torch.inference_mode():
        res = best_bandwidth(dst.copy_, (src,), 2 * src.numel() * 4 / 1e9, repeats)
    res.update(what=f"copy dst.copy_(src), float32, 2 x {src.numel() * 4 / 2**20:.0f} MiB")
    return res


def triad_rate(mib: float = MEMORY_MIB, repeats: int = 5) -> dict[str, Any]:
    """STREAM's triad ``c = a + s * b`` as ``torch.add(a, b, alpha=s, out=c)`` on float32 tensors of ``mib`` MiB:
    3 x ``mib`` MiB moved a call (read a and b, write c)."""
    a, b, c = _arrays(mib, 3)

    def triad(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.add(a, b, alpha=3.0, out=c)

    with torch.inference_mode():
        res = best_bandwidth(triad, (a, b, c), 3 * a.numel() * 4 / 1e9, repeats)
    res.update(what=f"triad torch.add(a, b, alpha=s, out=c), float32, 3 x {a.numel() * 4 / 2**20:.0f} MiB")
    return res


def memory_mib(scale: float = 1.0) -> float:
    """MiB of each array of the memory kernels at ``scale``: ``MEMORY_MIB`` x scale, at least ``MEMORY_MIN_MIB``."""
    return max(float(MEMORY_MIN_MIB), round(MEMORY_MIB * scale))


def machine_peaks(scale: float = 1.0, repeats: int = 5, log=None) -> dict[str, Any]:
    """The matmul, conv and memory peaks at the current ``torch.get_num_threads()``; sizes scaled by ``--scale`` (at
    least 64 for the matrices, 8 for the convolutions' inputs, ``MEMORY_MIN_MIB`` for the memory kernels' arrays)."""
    n = max(64, int(round(MATMUL_N * scale)))
    mm = matmul_rate(n, repeats)
    if log:
        log(f"peak: {mm['what']}: {mm['best_gflops_per_s']:.1f} GFLOP/s")
    convs = []
    for channels, size in CONV_SHAPES:
        c = conv3d_rate(channels, max(8, int(round(size * scale))), repeats)
        convs.append(c)
        if log:
            log(f"peak: {c['what']}: {c['best_gflops_per_s']:.1f} GFLOP/s")
    best = max(convs, key=lambda c: c["best_gflops_per_s"])
    mib = memory_mib(scale)
    memory = [copy_rate(mib, repeats), triad_rate(mib, repeats)]
    if log:
        for m in memory:
            log(f"peak: {m['what']}: {m['best_gb_per_s']:.1f} GB/s")
    fastest = max(memory, key=lambda m: m["best_gb_per_s"])
    return dict(threads=torch.get_num_threads(), repeats=repeats, matmul=mm, conv3d=convs,
                matmul_gflops_per_s=mm["best_gflops_per_s"], conv3d_gflops_per_s=best["best_gflops_per_s"],
                conv3d_best=best["what"], memory=memory, memory_gb_per_s=fastest["best_gb_per_s"],
                memory_best=fastest["what"])
