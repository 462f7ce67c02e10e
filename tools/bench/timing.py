"""How the benchmark times: autocast, CUDA synchronisation, the forward latency and the whole-volume run.

:func:`forward_times_ms` and :func:`volume_times_s` time runs that the caller has set up (model on the device,
``torch.inference_mode`` and :func:`autocast` around the call); every timed run is bracketed by :func:`sync`, so that
CUDA's asynchronous kernels are inside the time. :func:`make_inferer` builds the inferer of an entry's whole-volume run
(``SlidingWindowInferer``, or ``SliceInferer`` for a 2D network on a 3D volume) with the bundle's settings.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn

from bench.registry import Entry


def autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_times_ms(model: nn.Module, x: torch.Tensor, device: torch.device, warmup: int, repeats: int
                     ) -> list[float]:
    """``warmup`` untimed forwards of ``model`` on ``x``, then ``repeats`` timed ones: their times in ms."""
    for _ in range(warmup):
        model(x)
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        model(x)
        sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def volume_times_s(inferer: Callable, vol: torch.Tensor, model: nn.Module, device: torch.device, repeats: int
                   ) -> list[float]:
    """``repeats`` timed runs of ``inferer`` over the whole volume ``vol``, each output freed before the next run:
    their times in s."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = inferer(vol, model)
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return times


def make_inferer(entry: Entry, device: torch.device):
    from monai.inferers import SliceInferer, SlidingWindowInferer

    kwargs = dict(roi_size=entry.roi, sw_batch_size=entry.sw_batch_size, overlap=entry.overlap, mode=entry.mode,
                  sw_device=device, device=device)
    if entry.dims == 2 and entry.volume is not None and len(entry.volume) == 4:
        return SliceInferer(spatial_dim=entry.slice_axis if entry.slice_axis is not None else 2, **kwargs)
    return SlidingWindowInferer(**kwargs)
