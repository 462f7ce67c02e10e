"""Building blocks of the EMCAD decoder.

Rahman & Marculescu, "EMCAD: Efficient Multi-scale Convolutional Attention Decoding for Medical Image Segmentation",
CVPR 2024 (arXiv 2405.06880).

- :func:`channel_shuffle` (from ShuffleNet, Zhang et al., CVPR 2018),
- :class:`CAB` channel attention block and :class:`SAB` spatial attention block (CBAM-style, Woo et al., ECCV 2018),
- :class:`MSDC` multi-scale depth-wise convolution and :class:`MSCB` multi-scale convolution block,
- :class:`MSCAM` multi-scale convolutional attention module = CAB -> SAB -> MSCB,
- :class:`LGAG` large-kernel grouped attention gate,
- :class:`EUCB` efficient up-convolution block.

``CAB`` and ``SAB`` return the attention *gates* (to be multiplied with their input, as ``MSCAM`` does); the other
blocks return feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["channel_shuffle", "get_activation", "CAB", "SAB", "MSDC", "MSCB", "MSCAM", "LGAG", "EUCB"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel shuffle (Zhang et al., "ShuffleNet", CVPR 2018).

    Views the ``C`` channels as a ``groups x (C / groups)`` grid and transposes it:
    output channel ``j * groups + g`` is input channel ``g * (C / groups) + j``. A permutation of the channels
    (identity when ``groups`` is 1 or ``C``).
    """
    b, c, h, w = x.shape
    if c % groups != 0:
        raise ValueError(f"channels ({c}) must be divisible by groups ({groups}).")
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


def get_activation(name: str) -> nn.Module:
    """Activation module by (case-insensitive) name: relu, relu6, leakyrelu, gelu, silu/swish, hswish, prelu."""
    key = name.lower().replace("_", "")
    if key == "relu":
        return nn.ReLU(inplace=True)
    if key == "relu6":
        return nn.ReLU6(inplace=True)
    if key == "leakyrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if key == "gelu":
        return nn.GELU()
    if key in ("silu", "swish"):
        return nn.SiLU(inplace=True)
    if key in ("hswish", "hardswish"):
        return nn.Hardswish(inplace=True)
    if key == "prelu":
        return nn.PReLU()
    raise ValueError(f"Unsupported activation {name!r}.")


class CAB(nn.Module):
    """Channel attention block of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``CAB(x) = sigmoid(C2(ReLU(C1(AvgPool(x)))) + C2(ReLU(C1(MaxPool(x)))))`` with global average/max pooling and a
    shared bottleneck of bias-free 1x1 convolutions ``C1: C -> C / ratio`` and ``C2: C / ratio -> out``. Returns the
    gate of shape ``(B, out, 1, 1)``, values in (0, 1); the caller multiplies it with the input.

    Args:
        in_channels: input channels ``C``.
        out_channels: gate channels (defaults to ``in_channels``).
        ratio: bottleneck reduction ratio (16 in the paper); capped so the bottleneck keeps at least one channel.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, ratio: int = 16) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        reduced = max(in_channels // min(ratio, in_channels), 1)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(in_channels, reduced, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(self.avg_pool(x))))
        mx = self.fc2(self.act(self.fc1(self.max_pool(x))))
        return torch.sigmoid(avg + mx)


class SAB(nn.Module):
    """Spatial attention block of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``SAB(x) = sigmoid(Conv_kxk([mean_c(x); max_c(x)]))``: channel-wise mean and max maps, concatenated, one
    bias-free ``k x k`` convolution (k = 7) to a single map. Returns the gate ``(B, 1, H, W)`` in (0, 1).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = torch.mean(x, dim=1, keepdim=True)
        mx = torch.amax(x, dim=1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([avg, mx], dim=1)))


class MSDC(nn.Module):
    """Multi-scale depth-wise convolution of EMCAD (Rahman & Marculescu, CVPR 2024).

    One branch per kernel size ``k``: ``act(BN(DWConv_kxk(.)))`` (bias-free, padding ``k // 2``). With
    ``dw_parallel`` every branch sees the input ``x``; otherwise the branches run in sequence, each seeing
    ``x + previous branch output``. Returns the list of branch outputs.
    """

    def __init__(
        self,
        channels: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        stride: int = 1,
        activation: str = "relu6",
        dw_parallel: bool = True,
    ) -> None:
        super().__init__()
        self.dw_parallel = dw_parallel
        self.dwconvs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, k, stride, padding=k // 2, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                get_activation(activation),
            )
            for k in kernel_sizes
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for dwconv in self.dwconvs:
            out = dwconv(x)
            outputs.append(out)
            if not self.dw_parallel:
                x = x + out
        return outputs


class MSCB(nn.Module):
    """Multi-scale convolution block of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``MSCB(x) = BN(PWC2(CS(MSDC(act(BN(PWC1(x)))))))`` (+ ``x`` when ``in_channels == out_channels`` and stride 1):
    a bias-free 1x1 expansion to ``in_channels * expansion_factor`` channels, the multi-scale depth-wise convolutions
    (kernels 1/3/5), their outputs summed (``add=True``) or concatenated, a channel shuffle with
    ``gcd(combined, out_channels)`` groups, and a bias-free 1x1 projection + BN (no activation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: float = 2,
        dw_parallel: bool = True,
        add: bool = True,
        activation: str = "relu6",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.add = add
        self.use_skip_connection = stride == 1 and in_channels == out_channels
        ex_channels = int(in_channels * expansion_factor)
        self.pconv1 = nn.Sequential(
            nn.Conv2d(in_channels, ex_channels, 1, bias=False), nn.BatchNorm2d(ex_channels), get_activation(activation)
        )
        self.msdc = MSDC(ex_channels, kernel_sizes, stride, activation, dw_parallel=dw_parallel)
        combined = ex_channels if add else ex_channels * len(kernel_sizes)
        self.shuffle_groups = math.gcd(combined, out_channels)
        self.pconv2 = nn.Sequential(nn.Conv2d(combined, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.msdc(self.pconv1(x))
        if self.add:
            dout = outs[0]
            for i in range(1, len(outs)):
                dout = dout + outs[i]
        else:
            dout = torch.cat(outs, dim=1)
        out = self.pconv2(channel_shuffle(dout, self.shuffle_groups))
        if self.use_skip_connection:
            out = x + out
        return out


class MSCAM(nn.Module):
    """Multi-scale convolutional attention module of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``MSCAM(x) = MSCB(SAB(x') * x')`` with ``x' = CAB(x) * x``.

    Args:
        channels: input and output width.
        spatial_attention: an existing :class:`SAB` to use; the reference EMCAD decoder shares a single SAB (98
            parameters) across its four MSCAMs, so pass the same instance to each of them to reproduce it. A new SAB
            is created when None.
        ratio: CAB reduction ratio; the remaining arguments go to :class:`MSCB`.
    """

    def __init__(
        self,
        channels: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: float = 2,
        dw_parallel: bool = True,
        add: bool = True,
        activation: str = "relu6",
        ratio: int = 16,
        spatial_attention: SAB | None = None,
    ) -> None:
        super().__init__()
        self.cab = CAB(channels, ratio=ratio)
        self.sab = spatial_attention if spatial_attention is not None else SAB()
        self.mscb = MSCB(
            channels,
            channels,
            stride=1,
            kernel_sizes=kernel_sizes,
            expansion_factor=expansion_factor,
            dw_parallel=dw_parallel,
            add=add,
            activation=activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cab(x) * x
        x = self.sab(x) * x
        return self.mscb(x)


class LGAG(nn.Module):
    """Large-kernel grouped attention gate of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``LGAG(g, x) = x * sigmoid(BN(C1x1(ReLU(BN(GC3x3(g)) + BN(GC3x3(x))))))`` where ``g`` is the upsampled decoder
    map (gating signal), ``x`` the encoder skip, ``GC3x3`` a ``kernel_size`` group convolution (with bias) to
    ``inter_channels`` channels in ``groups`` groups and ``C1x1`` a 1x1 convolution (with bias) to one channel.

    Args:
        gate_channels: channels of ``g``.
        skip_channels: channels of ``x`` (and of the output).
        inter_channels: width of the gate's hidden map (default ``skip_channels // 2``, as in the reference).
        kernel_size: group-convolution kernel (3).
        groups: groups of the two group convolutions (default ``inter_channels``).
        activation: activation after the sum (ReLU).
    """

    def __init__(
        self,
        gate_channels: int,
        skip_channels: int,
        inter_channels: int | None = None,
        kernel_size: int = 3,
        groups: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        inter = max(skip_channels // 2, 1) if inter_channels is None else inter_channels
        groups = inter if groups is None else groups
        pad = kernel_size // 2
        self.w_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter, kernel_size, padding=pad, groups=groups, bias=True), nn.BatchNorm2d(inter)
        )
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter, kernel_size, padding=pad, groups=groups, bias=True), nn.BatchNorm2d(inter)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())
        self.act = get_activation(activation)

    def gate(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention coefficients ``(B, 1, H, W)`` in (0, 1)."""
        return self.psi(self.act(self.w_g(g) + self.w_x(x)))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(g, x)


class EUCB(nn.Module):
    """Efficient up-convolution block of EMCAD (Rahman & Marculescu, CVPR 2024).

    ``EUCB(x) = C1x1(CS(act(BN(DWC3x3(Up(x))))))``: nearest-neighbour upsampling by 2 (or to ``output_size``), a
    bias-free depth-wise ``kernel_size`` convolution, BN, activation, channel shuffle, and a 1x1 convolution (with bias)
    to ``out_channels``.

    ``shuffle_groups`` defaults to ``in_channels`` (as in the reference), which makes the shuffle the identity
    permutation; any shuffle in front of a full 1x1 convolution only permutes that convolution's weight columns, so it
    never changes what the block can represent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        activation: str = "relu",
        shuffle_groups: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.shuffle_groups = in_channels if shuffle_groups is None else shuffle_groups
        self.dwc = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            get_activation(activation),
        )
        self.pwc = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            # Same result as scale 2 when output_size is exactly twice the input size; otherwise resizes to the skip.
            x = F.interpolate(x, size=output_size, mode="nearest")
        x = self.dwc(x)
        return self.pwc(channel_shuffle(x, self.shuffle_groups))
