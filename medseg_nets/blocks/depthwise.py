# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Depth-wise 3D convolution with a faster CPU path, for the depth-wise dilated layers of GLIMS (DACB) and the separable
convolutions of DALight-3D (with point-wise convolutions as batched matrix products, :mod:`medseg_nets.blocks.cpu`;
on DALight-3D at its sliding-window batch the gain is within the machine's spread, ``docs/cpu_layers_dalight3d.md``).

On CPU, PyTorch 2.x runs a depth-wise ``Conv3d`` on a channels-first (``NCDHW``) tensor through a slow generic
kernel, and a *dilated* one through a slower one still, whatever the memory format. An undilated depth-wise
convolution on a channels-last (``NDHWC``) tensor goes through oneDNN and is several times faster. A dilated
convolution is an undilated one on the ``d^3`` interleaved sub-grids of the input (the "space-to-batch" identity
of atrous convolution: Chen et al., DeepLab, arXiv 1606.00915, Sec. 3.1), so both kinds can use that kernel:

``y = from_NDHWC(conv_{dilation 1}(space_to_batch_d(to_NDHWC(x))))``

with the input padded with zeros at the far end of each axis to a multiple of ``d`` (the zeros are the zero
padding the dilated convolution would have read there). It is the same arithmetic on the same values: on the CPUs
we measured the outputs are bit-identical to ``torch.nn.functional.conv3d`` (the tests allow float32 rounding,
which a different oneDNN kernel could bring). Only the layout changes; parameters, state-dict keys and FLOPs are
those of ``nn.Conv3d``.

Without autograd (inference) and with :mod:`medseg_nets.native` available, the CPU path is instead a fused C
kernel that reads and writes the channels-first tensors as they are (no layout copies; same arithmetic in another
order, float32 rounding apart; ``tests/test_native.py``).

The path is taken for CPU tensors only, and not while ``torch.export``/``torch.compile``/ONNX export or
``torch.jit.trace`` record the graph (they get the plain convolution); ``DepthwiseConv3d.cpu_fast_path = False``
turns it off for one layer, :func:`set_cpu_fast_path` for every such layer of a model.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils._python_dispatch import _get_current_dispatch_mode

from medseg_nets import native

__all__ = [
    "DepthwiseConv3d",
    "depthwise_conv3d_ndhwc",
    "from_ndhwc",
    "set_cpu_fast_path",
    "to_ndhwc",
    "use_cpu_fast_path",
    "use_native_kernels",
]


def use_cpu_fast_path(x: torch.Tensor) -> bool:
    """Whether :class:`DepthwiseConv3d` takes its channels-last CPU path for ``x``: a CPU tensor, outside graph
    capture (``torch.export``, ``torch.compile``, ONNX export, ``torch.jit.trace``; a TorchScript module decides
    per call)."""
    if x.device.type != "cpu":
        return False
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return False
    return True


@torch.jit.unused
def use_native_kernels(x: torch.Tensor) -> bool:
    """Whether the CPU fast paths may run :mod:`medseg_nets.native`'s fused kernels on ``x``: a contiguous float32
    CPU tensor outside graph capture (:func:`use_cpu_fast_path`), autograd off (inference), no ``TorchDispatchMode``
    active unless it says it sees the kernels (``sees_native_kernels = True``: the benchmark's traffic recorder,
    which observes them; ``FlopCounterMode`` counts the PyTorch operations instead), kernels available. Not callable
    from TorchScript (callers test ``torch.jit.is_scripting()`` first)."""
    mode = _get_current_dispatch_mode()
    return (
        not torch.is_grad_enabled()
        and (mode is None or bool(getattr(mode, "sees_native_kernels", False)))
        and x.dtype == torch.float32
        and x.is_contiguous()
        and use_cpu_fast_path(x)
        and native.available()
    )


def to_ndhwc(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> contiguous ``(N, D, H, W, C)`` (one copy; a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 4, 1).contiguous()


def from_ndhwc(y: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Contiguous ``(N, D, H, W, C)`` -> contiguous ``(N, C, D, H, W)``. Copied sample by sample as a 2D transpose:
    on CPU that is about three times faster than ``permute(...).contiguous()`` of the whole batch.

    ``out``: write into this ``(N, C, D, H, W)`` tensor instead (each sample contiguous, e.g. a channel slice of a
    larger buffer, so that results meant to be concatenated are written in place) and return it."""
    n, d, h, w, c = y.shape
    if out is None:
        out = torch.empty((n, c, d, h, w), dtype=y.dtype, device=y.device)
    for i in range(n):
        out[i].view(c, d * h * w).copy_(y[i].reshape(d * h * w, c).t())
    return out


def depthwise_conv3d_ndhwc(
    xl: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    dilation: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Depth-wise convolution of a contiguous ``(N, D, H, W, C)`` tensor with a cubic kernel ``weight`` ``(C, 1, k,
    k, k)`` (``k`` odd), stride 1 and 'same' zero padding ``dilation * (k // 2)``; returns contiguous ``(N, C, D,
    H, W)``, equal to ``F.conv3d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation, groups=C)``
    (written into ``out`` when given, see :func:`from_ndhwc`).
    """
    n, d0, h0, w0, c = xl.shape
    k = int(weight.shape[2])
    dil = int(dilation)
    if dil == 1:
        y = F.conv3d(xl.permute(0, 4, 1, 2, 3), weight, bias, padding=k // 2, groups=c)
        return from_ndhwc(y.permute(0, 2, 3, 4, 1).contiguous(), out)
    pads: List[int] = [(dil - s % dil) % dil for s in (d0, h0, w0)]
    if pads[0] > 0 or pads[1] > 0 or pads[2] > 0:
        xl = F.pad(xl, [0, 0, 0, pads[2], 0, pads[1], 0, pads[0]])
    d, h, w = (d0 + pads[0]) // dil, (h0 + pads[1]) // dil, (w0 + pads[2]) // dil
    # (n, D, H, W, c) -> (n * dil^3, D/dil, H/dil, W/dil, c): one sub-grid per offset along each axis; a temporary
    # argument, freed as soon as the convolution returns
    y = F.conv3d(
        xl.reshape(n, d, dil, h, dil, w, dil, c)
        .permute(0, 2, 4, 6, 1, 3, 5, 7)
        .reshape(n * dil * dil * dil, d, h, w, c)
        .permute(0, 4, 1, 2, 3),
        weight,
        bias,
        padding=k // 2,
        groups=c,
    ).permute(0, 2, 3, 4, 1)
    y = y.reshape(n, dil, dil, dil, d, h, w, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    y = y.reshape(n, d * dil, h * dil, w * dil, c)
    if pads[0] > 0 or pads[1] > 0 or pads[2] > 0:
        y = y[:, :d0, :h0, :w0, :]
    return from_ndhwc(y.contiguous(), out)


class DepthwiseConv3d(nn.Conv3d):
    """Depth-wise ``k x k x k`` convolution (one filter per channel, stride 1, 'same' zero padding
    ``dilation * (k // 2)``): an ``nn.Conv3d(channels, channels, k, padding=dilation * (k // 2), dilation=dilation,
    groups=channels)`` with the same parameters, initialisation and state-dict keys, whose CPU forward uses the
    channels-last path of this module (see the module docstring); on other devices it is ``nn.Conv3d``.

    Args:
        channels: input (= output) channels.
        kernel_size: odd kernel size ``k``.
        dilation: dilation, the same on every axis.
        bias: learnable bias.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, bias: bool = True) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        super().__init__(
            channels,
            channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=channels,
            bias=bias,
        )
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor, x_ndhwc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``(N, C, D, H, W)``. ``x_ndhwc``: optionally ``x`` already laid out as contiguous ``(N, D, H, W,
        C)`` (:func:`to_ndhwc`), used by the CPU path, so that parallel branches convert their common input once."""
        if self.cpu_fast_path and use_cpu_fast_path(x):
            if not torch.jit.is_scripting():
                if x_ndhwc is None and use_native_kernels(x):
                    return self._forward_native(x)
            return self.forward_ndhwc(to_ndhwc(x) if x_ndhwc is None else x_ndhwc, None)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The fused C kernel (:func:`medseg_nets.native.depthwise3d`), channels-first in and out."""
        return native.depthwise3d(x, self.weight, self.bias, self.dilation[0])

    @torch.jit.export
    def forward_ndhwc(self, x_ndhwc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CPU path on an input already laid out as contiguous ``(N, D, H, W, C)``, written into ``out`` when
        given (see :func:`depthwise_conv3d_ndhwc`); returns contiguous ``(N, C, D, H, W)``."""
        return depthwise_conv3d_ndhwc(x_ndhwc, self.weight, self.bias, self.dilation[0], out)


def set_cpu_fast_path(model: nn.Module, enabled: bool) -> int:
    """Turn the CPU path of every layer of ``model`` that has one (:class:`DepthwiseConv3d`, and
    :class:`~medseg_nets.blocks.cpu.PointwiseConv3d` / :class:`~medseg_nets.blocks.cpu.InstanceNorm3d`) on or off
    (off: the plain PyTorch layer, e.g. to compare); returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "cpu_fast_path", None), bool)]
    for m in layers:
        m.cpu_fast_path = bool(enabled)
    return len(layers)
