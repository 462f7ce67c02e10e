# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Faster CPU forwards of two common 3D layers, with the parameters, state-dict keys and outputs of the PyTorch layer
they subclass (see also :class:`~medseg_nets.blocks.depthwise.DepthwiseConv3d`).

- :class:`PointwiseConv3d` (``nn.Conv3d`` with kernel 1): oneDNN runs a 1x1x1 convolution of a channels-first
  (``NCDHW``) tensor by reordering it to a blocked layout and back, about three times slower than the same product
  as one batched matrix multiply ``W (C_out x C_in) @ X (C_in x DHW)``, which reads and writes the channels-first
  tensors as they are.
- :class:`InstanceNorm3d` (``nn.InstanceNorm3d`` without running statistics): ``F.instance_norm`` reshapes the input
  and runs batch norm's training kernel; ``F.group_norm`` with one group per channel is the same normalisation (per
  sample and channel over the voxels, biased variance, ``eps``, per-channel affine) and about twice as fast on a
  channels-first tensor. (PyTorch's channels-last group/batch-norm kernels accumulate their statistics in a way that
  loses up to ~1e-3 of the output range on 96^3 maps: they are not used.)

Measured on the project's 2-core CPUs at 1x72x96^3 -> 48 channels and 1x48x96^3 (``tools/benchmark.py --profile``
shows the layers in a network). The fast forwards are taken for contiguous CPU tensors outside graph capture
(:func:`~medseg_nets.blocks.depthwise.use_cpu_fast_path`); elsewhere the layers are their PyTorch parents. Outputs
equal the parents' to float32 rounding (``tests/test_cpu_layers.py``); ``cpu_fast_path = False`` on a layer, or
:func:`~medseg_nets.blocks.depthwise.set_cpu_fast_path` on a model, turns the fast forward off.

- :class:`PatchConv3d` / :class:`PatchConvTranspose3d` (``nn.Conv3d`` / ``nn.ConvTranspose3d`` with kernel ==
  stride, no padding: GLIMS's 2x2x2 down- and up-sampling): the patches do not overlap, so the convolution is one
  matrix product on the map reordered patch by patch (space-to-depth, or the product followed by depth-to-space for
  the transposed one): 1.5x (down) and 1.8x (up) faster than oneDNN at GLIMS's full-resolution widths (one-off
  timings, 2026-11-30).
- :class:`ConvNormPReLU` (``nn.Sequential(conv, norm, nn.PReLU())``, same keys): in inference on CPU, with
  :mod:`medseg_nets.native` available, the norm (one group per channel) and the PReLU run as one fused kernel
  (:func:`medseg_nets.native.norm_act`, in place on the convolution's output): one read for the statistics and one
  read-write pass instead of five passes.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_nets import native
from medseg_nets.blocks.depthwise import use_cpu_fast_path, use_native_kernels

__all__ = [
    "ConvNormPReLU",
    "InstanceNorm3d",
    "PatchConv3d",
    "PatchConvTranspose3d",
    "PointwiseConv3d",
    "native_norm_prelu",
    "patch_conv3d",
    "patch_conv_transpose3d",
    "pointwise_conv3d",
]


def pointwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv3d(x, weight, bias)`` for a kernel-1 ``weight`` ``(C_out, C_in, 1, 1, 1)`` and a contiguous
    channels-first ``x`` ``(N, C_in, D, H, W)``, as one batched matrix multiply (contiguous output)."""
    n, c, d, h, w = x.shape
    c_out = int(weight.shape[0])
    wm = weight.view(c_out, c).unsqueeze(0).expand(n, c_out, c)
    xm = x.reshape(n, c, d * h * w)
    if bias is None:
        y = torch.bmm(wm, xm)
    else:
        y = torch.baddbmm(bias.view(1, c_out, 1), wm, xm)
    return y.view(n, c_out, d, h, w)


class PointwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, 1, bias=bias)`` (same parameters, initialisation and keys) whose CPU
    forward on a contiguous channels-first tensor is :func:`pointwise_conv3d` (see the module docstring).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        bias: learnable bias.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        """``skip_bias``: leave the bias out (for a caller whose next step, a per-channel norm, removes it)."""
        bias = None if skip_bias else self.bias
        if self.cpu_fast_path and x.dim() == 5 and x.is_contiguous() and use_cpu_fast_path(x):
            return pointwise_conv3d(x, self.weight, bias)
        return self._conv_forward(x, self.weight, bias)


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same arguments, parameters and keys) whose CPU forward, for a contiguous
    channels-first 5D tensor and without running statistics, is ``F.group_norm`` with one group per channel (see
    the module docstring); otherwise ``F.instance_norm`` as ``nn.InstanceNorm3d`` does (5D input)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"InstanceNorm3d expects a 5D input (N, C, D, H, W), got {x.dim()} dims.")
        if self.cpu_fast_path and x.is_contiguous() and use_cpu_fast_path(x):
            return F.group_norm(x, int(x.shape[1]), self.weight, self.bias, self.eps)
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def patch_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=k)`` for a cubic ``weight`` ``(C_out, C_in, k, k, k)`` and a contiguous
    ``x`` ``(N, C_in, D, H, W)`` with ``D, H, W`` multiples of ``k``: the map reordered patch by patch
    (``(N, C_in k^3, DHW / k^3)``, one copy) and one batched matrix product (contiguous output)."""
    n, c, d0, h0, w0 = x.shape
    c_out, k = int(weight.shape[0]), int(weight.shape[2])
    d, h, w = d0 // k, h0 // k, w0 // k
    patches = x.reshape(n, c, d, k, h, k, w, k).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * k * k * k, d * h * w)
    wm = weight.reshape(c_out, c * k * k * k).unsqueeze(0).expand(n, c_out, c * k * k * k)
    y = torch.bmm(wm, patches) if bias is None else torch.baddbmm(bias.view(1, c_out, 1), wm, patches)
    return y.view(n, c_out, d, h, w)


def patch_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=k)`` for a cubic ``weight`` ``(C_in, C_out, k, k, k)`` and a
    contiguous ``x`` ``(N, C_in, D, H, W)``: one batched matrix product ``(C_out k^3, C_in) @ (C_in, DHW)``, each
    output patch then put in place (depth-to-space, one copy; contiguous output)."""
    n, c, d, h, w = x.shape
    c_out, k = int(weight.shape[1]), int(weight.shape[2])
    wm = weight.reshape(c, c_out * k * k * k).t().unsqueeze(0).expand(n, c_out * k * k * k, c)
    y = torch.bmm(wm, x.reshape(n, c, d * h * w)).view(n, c_out, k, k, k, d, h, w)
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, c_out, d * k, h * k, w * k)
    return y if bias is None else y.add_(bias.view(1, c_out, 1, 1, 1))


def _patch_fast_path(enabled: bool, x: torch.Tensor, multiple: int) -> bool:
    return (
        enabled
        and x.dim() == 5
        and x.is_contiguous()
        and use_cpu_fast_path(x)
        and x.shape[2] % multiple == 0
        and x.shape[3] % multiple == 0
        and x.shape[4] % multiple == 0
    )


class PatchConv3d(nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, k, stride=k)`` (same parameters, initialisation and keys): non-
    overlapping ``k^3`` patches (down-sampling by ``k``), whose CPU forward on a contiguous channels-first tensor with
    sizes divisible by ``k`` is :func:`patch_conv3d` (see the module docstring).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: patch size ``k`` (= stride).
        bias: learnable bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias)
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        """``skip_bias``: leave the bias out (for a caller whose next step, a per-channel norm, removes it)."""
        bias = None if skip_bias else self.bias
        if _patch_fast_path(self.cpu_fast_path, x, int(self.kernel_size[0])):
            return patch_conv3d(x, self.weight, bias)
        return self._conv_forward(x, self.weight, bias)


class PatchConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d(in_channels, out_channels, k, stride=k)`` (same parameters, initialisation and keys):
    up-sampling by ``k`` without overlap, whose CPU forward on a contiguous channels-first tensor is
    :func:`patch_conv_transpose3d` (see the module docstring).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: patch size ``k`` (= stride).
        bias: learnable bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias)
        self.cpu_fast_path = True

    def forward(self, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        """``skip_bias``: leave the bias out (for a caller whose next step, a per-channel norm, removes it)."""
        bias = None if skip_bias else self.bias
        if _patch_fast_path(self.cpu_fast_path, x, 1):
            return patch_conv_transpose3d(x, self.weight, bias)
        return F.conv_transpose3d(x, self.weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


def _per_channel_norm(norm: nn.Module, channels: int) -> bool:
    """``norm`` normalises each channel of each sample on its own: our :class:`InstanceNorm3d` (no running
    statistics) or ``nn.GroupNorm`` with one group per channel; and its CPU fast path is on."""
    if isinstance(norm, InstanceNorm3d):
        return bool(norm.cpu_fast_path) and not norm.track_running_stats and norm.num_features == channels
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == channels


@torch.jit.unused
def native_norm_prelu(
    x: torch.Tensor, norm: nn.Module, act: nn.Module, residual: Optional[torch.Tensor] = None, inplace: bool = False
) -> torch.Tensor:
    """``act(norm(x + residual))`` (``act(norm(x))`` without a residual): by :func:`medseg_nets.native.norm_act` when
    it applies (inference on CPU, kernels available, ``norm`` per channel as in :func:`_per_channel_norm`, ``act``
    an ``nn.PReLU``, ``residual`` shaped and laid out as ``x``), then written into ``x`` when ``inplace``; by the
    layers otherwise. Not callable from TorchScript."""
    fused = isinstance(act, nn.PReLU) and x.dim() >= 3 and _per_channel_norm(norm, int(x.shape[1]))
    fused = fused and use_native_kernels(x)
    fused = fused and (residual is None or (residual.shape == x.shape and residual.is_contiguous()))
    if not fused:
        return act(norm(x if residual is None else x + residual))
    return native.norm_act(
        x, out=x if inplace else None, residual=residual, weight=norm.weight, bias=norm.bias,
        prelu_weight=act.weight, eps=float(norm.eps),
    )  # fmt: skip


class ConvNormPReLU(nn.Sequential):
    """``nn.Sequential(conv, norm, nn.PReLU())`` (same modules, keys ``0.*``, ``1.*``, ``2.*``) whose norm and PReLU
    run as one fused kernel in inference on CPU (:func:`native_norm_prelu`, in place on the convolution's output);
    the layers otherwise. ``norm`` normalises per channel (:class:`InstanceNorm3d` or ``nn.GroupNorm(C, C)``) for the
    fused path to apply. On that path a :class:`PointwiseConv3d`, :class:`PatchConv3d` or
    :class:`PatchConvTranspose3d` runs without its bias: a per-channel constant is removed exactly by the norm's mean
    subtraction, and the matrix product without it is 1.3-1.6x faster (``torch.baddbmm`` broadcasts the bias in a
    pass of its own). :meth:`forward_parts` takes the parts of a channel concatenation and, for a point-wise
    convolution, never builds it.

    Args:
        conv: the convolution.
        norm: the normalisation of its output.
        act: the activation (an ``nn.PReLU`` for the fused path).
    """

    def __init__(self, conv: nn.Module, norm: nn.Module, act: nn.Module) -> None:
        super().__init__(conv, norm, act)

    @torch.jit.unused
    def _native(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The fused path, or ``None`` (before any work) when it does not apply."""
        conv, norm, act = self[0], self[1], self[2]
        if not isinstance(act, nn.PReLU) or not use_native_kernels(x):
            return None
        if not _per_channel_norm(norm, int(conv.out_channels)):
            return None
        if isinstance(conv, (PointwiseConv3d, PatchConv3d, PatchConvTranspose3d)):
            y = conv(x, skip_bias=True)  # the bias would be subtracted again by the norm
        else:
            y = conv(x)
        return native_norm_prelu(y, norm, act, inplace=True)

    @torch.jit.unused
    def _native_parts(self, parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """:meth:`forward_parts` on the fused path for a point-wise convolution, or ``None`` (before any work)."""
        conv, norm, act = self[0], self[1], self[2]
        if not isinstance(conv, PointwiseConv3d) or not conv.cpu_fast_path or not isinstance(act, nn.PReLU):
            return None
        if not _per_channel_norm(norm, int(conv.out_channels)) or not all(use_native_kernels(p) for p in parts):
            return None
        if any(p.dim() != 5 or p.shape[0] != parts[0].shape[0] or p.shape[2:] != parts[0].shape[2:] for p in parts):
            return None
        if sum(int(p.shape[1]) for p in parts) != int(conv.in_channels):
            return None
        # W @ [x_1; x_2; ...] = W_1 @ x_1 + W_2 @ x_2 + ... (the bias left out: the norm removes it)
        y: Optional[torch.Tensor] = None
        start = 0
        for p in parts:
            c = int(p.shape[1])
            w = conv.weight[:, start : start + c]
            term = pointwise_conv3d(p, w.contiguous(), None)
            y = term if y is None else y.add_(term)
            start += c
        return native_norm_prelu(y, norm, act, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            out = self._native(x)
            if out is not None:
                return out
        return self[2](self[1](self[0](x)))

    def forward_parts(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))``; on the fused path with a point-wise convolution the concatenation is
        not built (one matrix product per part, summed)."""
        if not torch.jit.is_scripting():
            out = self._native_parts(parts)
            if out is not None:
                return out
        return self.forward(torch.cat(parts, dim=1))
