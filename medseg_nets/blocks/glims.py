# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""Building blocks of GLIMS (Yazici, Oksuz, Ekenel, "GLIMS: Attention-Guided Lightweight Multi-Scale Hybrid Network
for Volumetric Semantic Segmentation", arXiv 2404.17854).

All blocks work on channels-first 3D feature maps ``(B, C, D, H, W)``. ``Conv-IN-PReLU`` below is a convolution
with bias, an InstanceNorm without affine parameters and a one-parameter PReLU (MONAI ``Convolution`` defaults
with ``norm="instance"``, ``act="prelu"``). The Swin parts (:class:`SwinStage3D` and below) are written from
scratch with MONAI's parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``,
``norm2``, ``mlp.linear1``, ``mlp.fn``, ``mlp.linear2``; ``norm``/``reduction`` for patch merging) so that the
whole network compiles with TorchScript and uses the right relative positions when a window is clamped to a
feature map smaller than the nominal window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_nets import native
from medseg_nets.blocks.cpu import (
    ConvNormPReLU,
    InstanceNorm3d,
    PatchConv3d,
    PatchConvTranspose3d,
    PointwiseConv3d,
    native_norm_prelu,
)
from medseg_nets.blocks.depthwise import DepthwiseConv3d, to_ndhwc, use_cpu_fast_path, use_native_kernels

__all__ = [
    "conv_in_prelu",
    "DACB",
    "DMSFBlock",
    "CSAB",
    "DMSUBlock",
    "channel_layer_norm",
    "WindowAttention3D",
    "SwinMlp",
    "SwinBlock3D",
    "PatchMerging3D",
    "PatchExpand3D",
    "PositionEmbedding3D",
    "SwinStage3D",
    "SwinUpStage3D",
    "effective_window",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


def conv_in_prelu(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, transposed: bool = False
) -> ConvNormPReLU:
    """``Conv (bias) -> InstanceNorm (no affine) -> PReLU (1 parameter)``; kernel 1 or ``kernel == stride``
    (no padding). ``transposed`` builds a transposed convolution (up-sampling by ``stride``). Kernel-1 convolutions
    and the norm are :class:`~medseg_nets.blocks.cpu.PointwiseConv3d` and :class:`~medseg_nets.blocks.cpu.
    InstanceNorm3d` (``nn.Conv3d`` / ``nn.InstanceNorm3d`` with faster CPU forwards, same parameters and keys), the
    sequence a :class:`~medseg_nets.blocks.cpu.ConvNormPReLU` (norm + PReLU fused in inference on CPU)."""
    conv: nn.Module
    if transposed:
        conv = (
            PatchConvTranspose3d(in_channels, out_channels, kernel_size)
            if kernel_size == stride
            else nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride)
        )
    elif kernel_size == 1 and stride == 1:
        conv = PointwiseConv3d(in_channels, out_channels)
    elif kernel_size == stride:
        conv = PatchConv3d(in_channels, out_channels, kernel_size)
    else:
        conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)
    return ConvNormPReLU(conv, InstanceNorm3d(out_channels), nn.PReLU())


class DACB(nn.Module):
    """Dilated feature Aggregator Convolutional Block (GLIMS, arXiv 2404.17854, Sec. 3.1).

    Three parallel depth-wise 3x3x3 convolutions with dilation ``d`` in (1, 2, 3) (bias, ``GroupNorm`` with one
    group per channel, PReLU) give ``Z_d``; their concatenation is embedded by a point-wise ``Conv-IN-PReLU``
    to ``E`` channels and projected back to ``C`` by a second one; the input is added and the sum normalised:

    ``Z_d = PReLU(GN(DWConv_d(x)))``,
    ``y = PReLU(IN(P_2(P_1([Z_1, Z_2, Z_3])) + x))``, ``P_i = PReLU(IN(Conv_{1x1x1}(.)))``.

    The shape is preserved. ``E = embed_channels`` (GLIMS uses ``2C`` everywhere). The depth-wise convolutions are
    :class:`~medseg_nets.blocks.depthwise.DepthwiseConv3d` (``nn.Conv3d`` with a faster CPU path, same numbers). On
    CPU the branches share one channels-last copy of ``x``, write their convolutions straight into the concatenated
    ``3C``-channel map, and their three per-channel GroupNorms and one-parameter PReLUs run as one GroupNorm with
    ``3C`` groups and one per-channel PReLU over that map (the same per-channel arithmetic, one pass each instead of
    three plus the concatenation's copy). In inference with :mod:`medseg_nets.native` available, the whole block
    runs as fused C kernels on the channels-first maps (:meth:`_forward_native`): one kernel computes ``[Z_1, Z_2,
    Z_3]`` reading ``x`` once (each channel's GroupNorm + PReLU applied as soon as its convolution is done, while it
    is in cache), each point-wise ``Conv-IN-PReLU`` is a matrix product and one fused norm + PReLU, and the residual
    add, the last norm and PReLU one more.

    ``spare_act``: the reference implementation builds one more PReLU in every DACB that its forward never uses
    (1 parameter). It is reproduced, frozen (``requires_grad=False``) so that it cannot trouble
    ``DistributedDataParallel``, only so that the parameter count equals the reference (16 such parameters in
    GLIMS); it does not take part in the computation.

    Args:
        channels: number of input (= output) channels ``C``.
        embed_channels: width ``E`` of the first point-wise convolution; default ``2C``.
        dilations: dilation of each depth-wise branch.
        kernel_size: kernel size of the depth-wise convolutions.
        spare_act: build the unused, frozen PReLU of the reference.
    """

    def __init__(
        self,
        channels: int,
        embed_channels: Optional[int] = None,
        dilations: Sequence[int] = (1, 2, 3),
        kernel_size: int = 3,
        spare_act: bool = True,
    ) -> None:
        super().__init__()
        embed = 2 * channels if embed_channels is None else int(embed_channels)
        self.branches = nn.ModuleList(
            [
                nn.Sequential(DepthwiseConv3d(channels, kernel_size, d), nn.GroupNorm(channels, channels), nn.PReLU())
                for d in dilations
            ]
        )
        self.embed = conv_in_prelu(len(dilations) * channels, embed)
        self.project = conv_in_prelu(embed, channels)
        self.norm = InstanceNorm3d(channels)
        self.act = nn.PReLU()
        self.cpu_fast_path = True  # the fused CPU path of the branches (needs theirs on too)
        self.branch_eps = float(self.branches[0][1].eps)  # the branches' GroupNorm eps (all built alike)
        if spare_act:
            self.spare_act = nn.PReLU()
            self.spare_act.weight.requires_grad_(False)

    def _fused_branches(self, x: torch.Tensor) -> torch.Tensor:
        """CPU path of the branches: ``[Z_1, Z_2, Z_3]`` computed into one buffer (see the class docstring)."""
        n, c, d, h, w = x.shape
        k = len(self.branches)
        z = x.new_empty((n, k * c, d, h, w))
        xl = to_ndhwc(x)
        gn_w: List[torch.Tensor] = []
        gn_b: List[torch.Tensor] = []
        act_w: List[torch.Tensor] = []
        for i, branch in enumerate(self.branches):
            conv, gn, act = branch[0], branch[1], branch[2]
            conv.forward_ndhwc(xl, z[:, i * c : (i + 1) * c])
            gn_w.append(gn.weight)
            gn_b.append(gn.bias)
            act_w.append(act.weight.expand(c))
        z = F.group_norm(z, k * c, torch.cat(gn_w), torch.cat(gn_b), self.branch_eps)
        return F.prelu(z, torch.cat(act_w))

    @torch.jit.unused
    def _native_ok(self, x: torch.Tensor) -> bool:
        """The fused C path applies: inference on CPU with the kernels available, every CPU path of the block on."""
        if not (self.cpu_fast_path and bool(self.norm.cpu_fast_path) and use_native_kernels(x)):
            return False
        return all(bool(b[0].cpu_fast_path) and isinstance(b[2], nn.PReLU) for b in self.branches)

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The block as fused C kernels (:mod:`medseg_nets.native`; see the class docstring)."""
        convs = [branch[0] for branch in self.branches]
        z = native.depthwise3d_branches(
            x, [conv.weight for conv in convs], [conv.bias for conv in convs], [conv.dilation[0] for conv in convs],
            norm_weights=[branch[1].weight for branch in self.branches],
            norm_biases=[branch[1].bias for branch in self.branches],
            prelu_weights=[branch[2].weight for branch in self.branches], eps=self.branch_eps,
        )  # fmt: skip
        y = self.embed(z)
        del z  # the 3C-channel map, before the projection
        y = self.project(y)
        return native_norm_prelu(y, self.norm, self.act, residual=x, inplace=True)

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        """The branches one by one, concatenated; on CPU their depth-wise convolutions share one channels-last copy
        of ``x``. Their outputs are freed on return, before the point-wise convolutions where the block's memory
        peaks."""
        feats: List[torch.Tensor] = []
        xl: Optional[torch.Tensor] = None  # x laid out channels-last once for the branches' CPU path
        for branch in self.branches:
            conv = branch[0]
            if conv.cpu_fast_path and use_cpu_fast_path(x):
                if xl is None:
                    xl = to_ndhwc(x)
                feats.append(branch[2](branch[1](conv(x, xl))))
            else:
                feats.append(branch(x))
        return torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._native_ok(x):
                return self._forward_native(x)
        fused = self.cpu_fast_path and x.is_contiguous() and use_cpu_fast_path(x)
        for branch in self.branches:
            fused = fused and bool(branch[0].cpu_fast_path)
        y = self._fused_branches(x) if fused else self._branches(x)
        y = self.embed(y)  # the branches' 3C-channel map is freed here, before the projection
        return self.act(self.norm(self.project(y) + x))


class DMSFBlock(nn.Module):
    """Down-sampling encoder stage of GLIMS (DMSF, arXiv 2404.17854, Sec. 3.1).

    Two :class:`DACB` (embedding ``2C``) at the input width, then a 2x2x2 stride-2 ``Conv-IN-PReLU`` that halves
    the resolution and changes the width: ``s = DACB(DACB(x))``, ``y = PReLU(IN(Conv_{2x2x2, s=2}(s)))``.
    Returns ``(s, y)``; ``s`` is the skip.

    Args:
        in_channels: width of the stage (and of the skip).
        out_channels: width after down-sampling.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.dacb1 = DACB(in_channels, 2 * in_channels)
        self.dacb2 = DACB(in_channels, 2 * in_channels)
        self.down = conv_in_prelu(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = self.dacb2(self.dacb1(x))
        return skip, self.down(skip)


class CSAB(nn.Module):
    """Channel and Spatial-wise Attention Block (GLIMS, arXiv 2404.17854, Sec. 3.3), applied to a skip.

    Two gates computed in parallel from the same input (CBAM's gates, Woo et al. 2018) multiply it:

    ``M_c = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))``, weight-shared ``MLP = Linear(C, C/r) -> ReLU ->
    Linear(C/r, C)`` (``r = 2``),
    ``M_s = sigmoid(PReLU(N(Conv_{7x7x7}([Max_c(x), Mean_c(x)]))))`` (convolution without bias, padding 3),
    ``y = x * M_c * M_s``.

    The norm ``N`` has one weight and one bias. The reference applies a ``LayerNorm`` over the channel axis of this
    one-channel map, which normalises every voxel to 0 and turns ``M_s`` into a constant; ``spatial_norm="layer"``
    reproduces that exactly. The default ``"instance"`` normalises the map over its voxels (affine, the same two
    parameters; ``GroupNorm(1, 1)``), so that ``M_s`` is the spatial attention map the paper describes.

    Args:
        channels: number of channels ``C``.
        reduction: MLP reduction ratio ``r``; hidden width ``max(C // r, 1)``.
        spatial_kernel_size: kernel size of the spatial-attention convolution.
        spatial_norm: ``"instance"`` (default) or ``"layer"`` (the reference's, degenerate).
    """

    def __init__(
        self, channels: int, reduction: int = 2, spatial_kernel_size: int = 7, spatial_norm: str = "instance"
    ) -> None:
        super().__init__()
        if spatial_norm not in ("instance", "layer"):
            raise ValueError(f"spatial_norm must be 'instance' or 'layer', got {spatial_norm!r}.")
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.spatial = nn.Conv3d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, bias=False)
        self.channel_last_norm = spatial_norm == "layer"
        self.spatial_norm: nn.Module = nn.LayerNorm(1) if self.channel_last_norm else nn.GroupNorm(1, 1)
        self.spatial_act = nn.PReLU()

    def attention_maps(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the channel gate ``(B, C, 1, 1, 1)`` and the spatial gate ``(B, 1, D, H, W)``, both in (0, 1)."""
        b, c = x.shape[0], int(x.shape[1])  # batch left symbolic: ONNX export with a dynamic batch
        avg = torch.mean(x, dim=(2, 3, 4))
        mx = torch.amax(x, dim=(2, 3, 4))
        channel_gate = torch.sigmoid(self.mlp(avg) + self.mlp(mx)).view(b, c, 1, 1, 1)
        pooled = torch.cat([torch.amax(x, dim=1, keepdim=True), torch.mean(x, dim=1, keepdim=True)], dim=1)
        s: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            s = self._spatial_native(pooled)
        if s is None:
            s = self.spatial(pooled)
        if self.channel_last_norm:
            s = self.spatial_norm(s.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        else:
            s = self.spatial_norm(s)
        spatial_gate = torch.sigmoid(self.spatial_act(s))
        return channel_gate, spatial_gate

    @torch.jit.unused
    def _spatial_native(self, pooled: torch.Tensor) -> Optional[torch.Tensor]:
        """``self.spatial(pooled)`` (2 channels -> 1, ``k^3``, no bias) as the sum of the two channels' depth-wise
        convolutions by :func:`medseg_nets.native.depthwise3d` (5x faster than oneDNN's 7^3 convolution on a 96^3
        map, one-off timing); ``None`` outside inference on CPU (:func:`~medseg_nets.blocks.depthwise.use_native_kernels`) or where
        that layer is not the plain 'same' convolution this assumes."""
        conv = self.spatial
        if not use_native_kernels(pooled):
            return None
        k = int(conv.kernel_size[0])
        if conv.bias is not None or conv.dilation[0] != 1 or conv.stride[0] != 1 or conv.padding[0] != k // 2:
            return None
        y = native.depthwise3d(pooled, conv.weight.reshape(2, 1, k, k, k), None, 1)
        return y[:, :1] + y[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_gate, spatial_gate = self.attention_maps(x)
        return x * (channel_gate * spatial_gate)


class DMSUBlock(nn.Module):
    """Up-sampling decoder stage of GLIMS (DMSU, arXiv 2404.17854, Sec. 3.4).

    ``u = PReLU(IN(ConvT_{2x2x2, s=2}(x)))``, ``y = DACB(DACB(PReLU(IN(Conv_{1x1x1}([u, skip])))))``; the DACBs
    work at the output width ``C_out`` with embedding width ``C_in`` (``= 2 C_out`` in GLIMS).

    Args:
        in_channels: width of the deeper feature map ``C_in``.
        out_channels: width of the skip and of the output ``C_out``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = conv_in_prelu(in_channels, out_channels, kernel_size=2, stride=2, transposed=True)
        self.fuse = conv_in_prelu(2 * out_channels, out_channels)
        self.dacb1 = DACB(out_channels, in_channels)
        self.dacb2 = DACB(out_channels, in_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.fuse.forward_parts([self.up(x), skip])  # = self.fuse(torch.cat([self.up(x), skip], dim=1))
        return self.dacb2(self.dacb1(y))


def channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the channels of a channels-first map, without parameters (MONAI SwinViT's ``proj_out``)."""
    y = F.layer_norm(x.permute(0, 2, 3, 4, 1), [int(x.shape[1])])
    return y.permute(0, 4, 1, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Swin Transformer parts (Liu et al., "Swin Transformer", arXiv 2103.14030), 3D, TorchScript-friendly.
# ----------------------------------------------------------------------------------------------------------------


def effective_window(dims: List[int], window_size: List[int], shift: bool) -> Tuple[List[int], List[int]]:
    """Window and shift per axis: a window is clamped to a smaller feature map, where it is not shifted."""
    window: List[int] = []
    shifts: List[int] = []
    for i in range(len(dims)):
        if dims[i] <= window_size[i]:
            window.append(dims[i])
            shifts.append(0)
        else:
            window.append(window_size[i])
            shifts.append(window_size[i] // 2 if shift else 0)
    return window, shifts


def relative_position_index(
    window: List[int], max_window: List[int], device: torch.device, cropped: bool = False
) -> torch.Tensor:
    """Index ``(n, n)`` into a ``(2M_d-1)(2M_h-1)(2M_w-1)`` relative position bias table for a window ``window``
    (each axis at most ``max_window``): ``idx = dd (2M_h-1)(2M_w-1) + dh (2M_w-1) + dw`` with ``dx = x_i - x_j + M-1``.

    ``cropped=True`` returns instead the top-left ``(n, n)`` block of the index of the full ``max_window`` window,
    what MONAI's SwinUNETR and the GLIMS release do for a clamped window (``relative_position_index[:n, :n]``): the
    ``n`` tokens of the clamped window are then given the offsets of the first ``n`` tokens of the full window, which
    are not their offsets unless the window is the full one or only its first axis is shorter.
    """
    n = window[0] * window[1] * window[2]
    # token coordinates: those of the window itself, or (cropped) those of the first n tokens of the full window
    layout = max_window if cropped else window
    t = torch.arange(n, device=device)
    cd = torch.div(t, layout[1] * layout[2], rounding_mode="floor")
    ch = torch.remainder(torch.div(t, layout[2], rounding_mode="floor"), layout[1])
    cw = torch.remainder(t, layout[2])
    rd = cd[:, None] - cd[None, :] + (max_window[0] - 1)
    rh = ch[:, None] - ch[None, :] + (max_window[1] - 1)
    rw = cw[:, None] - cw[None, :] + (max_window[2] - 1)
    return (rd * (2 * max_window[1] - 1) + rh) * (2 * max_window[2] - 1) + rw


def window_partition(x: torch.Tensor, window: List[int]) -> torch.Tensor:
    """``(B, D, H, W, C)`` -> ``(B * num_windows, wd * wh * ww, C)``."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous()
    return x.view(-1, window[0] * window[1] * window[2], c)


def window_reverse(windows: torch.Tensor, window: List[int], b: int, d: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * num_windows, n, C)`` -> ``(B, D, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous()
    return x.view(b, d, h, w, c)


def shifted_window_mask(dims: List[int], window: List[int], shifts: List[int], device: torch.device) -> torch.Tensor:
    """Additive attention mask ``(num_windows, n, n)`` (0 or -100) of shifted-window attention: tokens coming from
    different regions of the cyclically shifted map must not attend to each other (Swin, Sec. 3.2)."""
    region: List[torch.Tensor] = []
    for i in range(3):
        coord = torch.arange(dims[i], device=device)
        r = (coord >= dims[i] - window[i]).long()
        if shifts[i] > 0:
            r = r + (coord >= dims[i] - shifts[i]).long()
        region.append(r)
    ids = region[0][:, None, None] * 9 + region[1][None, :, None] * 3 + region[2][None, None, :]
    ids = window_partition(ids[None, :, :, :, None].float(), window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


class WindowAttention3D(nn.Module):
    """Window multi-head self-attention with a relative position bias (Swin, arXiv 2103.14030, Eq. 4):

    ``Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B + mask) V``, ``B`` looked up in a learnable table of
    ``(2M-1)^3`` entries per head.

    Args:
        dim: token width.
        num_heads: number of heads (must divide ``dim``).
        window_size: nominal window ``M`` per axis; smaller (clamped) windows index the same table.
        qkv_bias: learnable bias of the query/key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.window_size: List[int] = [int(s) for s in window_size]
        self.scale = float((dim // num_heads) ** -0.5)
        table = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) * (2 * self.window_size[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, rel_index: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0).to(attn.dtype)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = torch.softmax(attn, dim=-1)
        y = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class SwinMlp(nn.Module):
    """Two-layer MLP of a Swin block: ``linear2(fn(linear1(x)))``, ``Linear(C, rC) -> act -> Linear(rC, C)``
    (MONAI ``MLPBlock`` names). ``act``: ``"prelu"`` (one parameter; GLIMS) or ``"gelu"`` (Swin's default)."""

    def __init__(self, dim: int, hidden: int, act: str = "prelu") -> None:
        super().__init__()
        if act not in ("prelu", "gelu"):
            raise ValueError(f"act must be 'prelu' or 'gelu', got {act!r}.")
        self.linear1 = nn.Linear(dim, hidden)
        self.fn: nn.Module = nn.PReLU() if act == "prelu" else nn.GELU()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.fn(self.linear1(x)))


class SwinBlock3D(nn.Module):
    """Swin Transformer block (arXiv 2103.14030, Eq. 3), channels-last ``(B, D, H, W, C)``:

    ``z' = (S)W-MSA(LN(z)) + z``, ``z'' = MLP(LN(z')) + z'``.

    Even blocks use regular windows, odd blocks windows shifted by ``M // 2`` (only on axes longer than ``M``).
    Feature maps are padded to a multiple of the window after ``LN`` and cropped back after the attention.

    Args:
        dim: token width.
        num_heads: number of attention heads.
        window_size: nominal window per axis.
        shift: whether this block uses shifted windows.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: learnable bias of the query/key/value projection.
        mlp_act: activation of the MLP (see :class:`SwinMlp`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mlp_act: str = "prelu",
    ) -> None:
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio), mlp_act)

    def forward(
        self,
        x: torch.Tensor,
        window: List[int],
        shifts: List[int],
        rel_index: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        b, d, h, w, c = x.shape
        y = self.norm1(x)
        pd = (window[0] - d % window[0]) % window[0]
        ph = (window[1] - h % window[1]) % window[1]
        pw = (window[2] - w % window[2]) % window[2]
        if pd > 0 or ph > 0 or pw > 0:
            y = F.pad(y, [0, 0, 0, pw, 0, ph, 0, pd])
        dp, hp, wp = d + pd, h + ph, w + pw
        shifted = shifts[0] > 0 or shifts[1] > 0 or shifts[2] > 0
        if shifted:
            y = torch.roll(y, shifts=[-shifts[0], -shifts[1], -shifts[2]], dims=[1, 2, 3])
            attn_mask = mask
        else:
            attn_mask = None
        windows = self.attn(window_partition(y, window), rel_index, attn_mask)
        y = window_reverse(windows, window, b, dp, hp, wp)
        if shifted:
            y = torch.roll(y, shifts=[shifts[0], shifts[1], shifts[2]], dims=[1, 2, 3])
        if pd > 0 or ph > 0 or pw > 0:
            y = y[:, :d, :h, :w, :].contiguous()
        x = x + y
        return x + self.mlp(self.norm2(x))


# offsets (d, h, w) of the eight voxels concatenated by patch merging: "merging" is the order of MONAI's
# ``PatchMerging`` (v0.9.0; it takes two offsets twice and skips (0, 1, 1) and (1, 1, 0)), used by SwinUNETR and by
# the GLIMS reference; "mergingv2" is MONAI's ``PatchMergingV2`` (all eight offsets).
_MERGE_OFFSETS = {
    "merging": [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)],
    "mergingv2": [(i, j, k) for i in range(2) for j in range(2) for k in range(2)],
}


class PatchMerging3D(nn.Module):
    """Patch merging (Swin, arXiv 2103.14030, Sec. 3.3), 3D: concatenate the voxels of each 2x2x2 neighbourhood
    (8C), ``LN``, ``Linear(8C, 2C)`` without bias; channels-first in and out,
    ``(B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2)`` (even sizes).

    Args:
        dim: input width ``C``.
        mode: ``"merging"`` (MONAI's default ``PatchMerging``, as in the reference) or ``"mergingv2"``.
    """

    def __init__(self, dim: int, mode: str = "merging") -> None:
        super().__init__()
        if mode not in _MERGE_OFFSETS:
            raise ValueError(f"mode must be one of {sorted(_MERGE_OFFSETS)}, got {mode!r}.")
        self.offsets: List[List[int]] = [list(o) for o in _MERGE_OFFSETS[mode]]
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        parts: List[torch.Tensor] = []
        for o in self.offsets:
            parts.append(x[:, o[0] :: 2, o[1] :: 2, o[2] :: 2, :])
        y = self.reduction(self.norm(torch.cat(parts, dim=-1)))
        return y.permute(0, 4, 1, 2, 3).contiguous()


class PatchExpand3D(nn.Module):
    """Patch expanding (Swin-Unet, Cao et al. 2021), 3D: ``Linear(C, 4C)`` without bias per voxel, the ``4C`` values
    read as ``(p_h, p_w, p_d, C/2)`` are laid out on the 2x2x2 neighbourhood (``p_d`` along ``D``, ``p_h`` along
    ``H``, ``p_w`` along ``W``, the reference's layout), then ``LN(C/2)``; channels-first in and out,
    ``(B, C, D, H, W) -> (B, C/2, 2D, 2H, 2W)``.

    Args:
        dim: input width ``C`` (even).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"dim must be even, got {dim}.")
        self.expand = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]  # left symbolic: ONNX export with a dynamic batch
        c, d, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3]), int(x.shape[4])
        y = self.expand(x.permute(0, 2, 3, 4, 1)).view(b, d, h, w, 2, 2, 2, c // 2)
        # (b, d, h, w, p_h, p_w, p_d, c') -> (b, d, p_d, h, p_h, w, p_w, c')
        y = y.permute(0, 1, 6, 2, 4, 3, 5, 7).reshape(b, 2 * d, 2 * h, 2 * w, c // 2)
        return self.norm(y).permute(0, 4, 1, 2, 3).contiguous()


class PositionEmbedding3D(nn.Module):
    """Learnable absolute position embedding added to a channels-first map, ``y = x + P``, ``P`` of shape
    ``(1, C, prod(grid))`` (the reference's layout), initialised with a truncated normal (std 0.02).

    On a map whose size differs from ``grid`` (a patch size other than the one the network was built for), ``P`` is
    resampled trilinearly to the map size (``align_corners=False``), the usual way of running a ViT at another
    resolution.

    Args:
        dim: width ``C``.
        grid: size ``(D, H, W)`` of the map the embedding is laid out for.
    """

    def __init__(self, dim: int, grid: Sequence[int]) -> None:
        super().__init__()
        self.grid: List[int] = [int(g) for g in grid]
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be three positive sizes, got {tuple(grid)}.")
        self.position_embeddings = nn.Parameter(torch.zeros(1, dim, self.grid[0] * self.grid[1] * self.grid[2]))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(self.position_embeddings.shape[1])
        p = self.position_embeddings.view(1, c, self.grid[0], self.grid[1], self.grid[2])
        size = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        if size != self.grid:
            p = F.interpolate(p, size=size, mode="trilinear", align_corners=False)
        return x + p.to(x.dtype)


def init_transformer_weights(m: nn.Module) -> None:
    """The usual ViT/Swin/PVT initialisation, for ``module.apply``: truncated-normal (std 0.02) linear weights, zero
    biases, LayerNorm weight 1 and bias 0; other modules are left as they are."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinStage3D(nn.Module):
    """``depth`` :class:`SwinBlock3D` (alternating regular and shifted windows) on a channels-first map, after an
    optional :class:`PositionEmbedding3D` (``grid``): ``(B, C, D, H, W) -> (B, C, D, H, W)``.

    The window is clamped per axis to the map size (and not shifted there, as in MONAI); the relative position
    index and the shifted-window mask are built for the actual window.

    Args:
        dim: width.
        depth: number of blocks.
        num_heads: number of attention heads.
        window_size: nominal window per axis.
        mlp_ratio: hidden width of the MLPs relative to ``dim``.
        qkv_bias: learnable bias of the query/key/value projections.
        mlp_act: activation of the MLPs (see :class:`SwinMlp`).
        grid: size of the position embedding; ``None``: no position embedding.
        relative_position: relative position bias of a window clamped to a smaller map: ``"offsets"`` (the true
            offsets of its tokens, Swin's definition) or ``"cropped"`` (the GLIMS release's and MONAI SwinUNETR's
            ``[:n, :n]`` crop of the full window's index, see :func:`relative_position_index`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int] = (7, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mlp_act: str = "prelu",
        grid: Optional[Sequence[int]] = None,
        relative_position: str = "offsets",
    ) -> None:
        super().__init__()
        if relative_position not in ("offsets", "cropped"):
            raise ValueError(f"relative_position must be 'offsets' or 'cropped', got {relative_position!r}.")
        self.cropped_index = relative_position == "cropped"
        self.window_size: List[int] = [int(s) for s in window_size]
        self.pos: nn.Module = PositionEmbedding3D(dim, grid) if grid is not None else nn.Identity()
        self.blocks = nn.ModuleList(
            [
                SwinBlock3D(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias, mlp_act)
                for i in range(depth)
            ]
        )
        self.blocks.apply(init_transformer_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos(x)
        dims = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        window, _ = effective_window(dims, self.window_size, False)
        _, shifts = effective_window(dims, self.window_size, True)
        padded = [dims[i] + (window[i] - dims[i] % window[i]) % window[i] for i in range(3)]
        rel_index = relative_position_index(window, self.window_size, x.device, self.cropped_index)
        mask: Optional[torch.Tensor] = None
        if shifts[0] > 0 or shifts[1] > 0 or shifts[2] > 0:
            mask = shifted_window_mask(padded, window, shifts, x.device)
        no_shift = [0, 0, 0]
        y = x.permute(0, 2, 3, 4, 1).contiguous()
        for blk in self.blocks:
            y = blk(y, window, shifts if blk.shift else no_shift, rel_index, mask)
        return y.permute(0, 4, 1, 2, 3).contiguous()


class SwinUpStage3D(nn.Module):
    """Transformer up-sampling stage of GLIMS (decoder side of the hybrid bottleneck):

    ``u = PE(PatchExpand(x))`` (``2C -> C``, twice the resolution, position embedding ``PE``),
    ``y = SwinStage(PReLU(IN(Conv_{1x1x1}([u, skip]))))`` (``2C -> C``).

    Args:
        dim: output width ``C`` (the input has ``2C``, the skip ``C`` channels).
        depth, num_heads, window_size, mlp_ratio, qkv_bias, mlp_act, relative_position: see :class:`SwinStage3D`.
        grid: size of the position embedding (the output map size the network is built for).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int] = (7, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mlp_act: str = "prelu",
        grid: Sequence[int] = (6, 6, 6),
        relative_position: str = "offsets",
    ) -> None:
        super().__init__()
        self.upsample = PatchExpand3D(2 * dim)
        self.upsample.apply(init_transformer_weights)
        self.pos = PositionEmbedding3D(dim, grid)
        self.fuse = conv_in_prelu(2 * dim, dim)
        self.stage = SwinStage3D(
            dim, depth, num_heads, window_size, mlp_ratio, qkv_bias, mlp_act, None, relative_position
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = self.pos(self.upsample(x))
        return self.stage(self.fuse.forward_parts([u, skip]))  # = self.fuse(torch.cat([u, skip], dim=1))
