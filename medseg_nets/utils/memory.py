# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""CPU memory allocator settings (glibc ``malloc``) for inference and training on CPU.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block over 32 MiB with a fresh ``mmap`` and hands
it back with ``munmap`` when the tensor is freed, so each forward pass of a 3D network at 96^3 maps, zero-fills
(page fault by page fault) and unmaps gigabytes of memory again. :func:`keep_freed_memory` tells glibc to take such
blocks from the heap and to keep freed memory (up to 2 GiB at the top of the heap) for the next tensor, as CUDA's
caching allocator does on the GPU; on the 2-core VM we measured, that took GLIMS's whole-volume sweep case from
47.2 s to 24.5 s (``tools/benchmark.py --bundle glims --sweep [--keep-freed-memory]``). Numbers do not change; the
process keeps its peak resident memory instead of shrinking between passes (fragmentation can leave that peak
somewhat higher than with the default allocator). The same effect from the shell, for any process:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Optional

import torch

from .cli import as_bool

__all__ = ["keep_freed_memory", "malloc_trim"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the top of the heap


def _glibc() -> Optional[Any]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - absent outside glibc (musl)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(device: Any = "cpu", enabled: Any = True) -> bool:
    """Make glibc ``malloc`` reuse freed memory for large CPU tensors instead of unmapping and re-faulting it.

    Process-wide and one-way (it is meant for a process that runs a bundle); a no-op that returns False when
    ``enabled`` is false (``as_bool``: "false"/"0"/"no" from the command line), when ``device`` is not a CPU device
    (CUDA tensors have their own caching allocator) or outside Linux/glibc. Returns whether the settings were taken.
    """
    if not as_bool(enabled) or torch.device(device).type != "cpu":
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def malloc_trim() -> bool:
    """Give the free memory of glibc's heap back to the OS (``malloc_trim(0)``); False outside glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
