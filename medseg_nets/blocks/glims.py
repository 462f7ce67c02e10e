"""Building blocks of GLIMS (Yazici et al., "GLIMS: Attention-Guided Lightweight Multi-Scale Hybrid Network for
Volumetric Semantic Segmentation", arXiv 2404.17854).

All blocks work on 3D feature maps ``(B, C, D, H, W)``; the Swin parts (:class:`SwinStage3D` and below) are
written from scratch (same parameter shapes as MONAI's ``SwinTransformerBlock`` / ``PatchMerging``) so that the
whole network can be compiled with TorchScript and computes correct relative positions when a window is clamped
to a feature map smaller than the nominal window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DACB",
    "DMSFBlock",
    "CSAB",
    "DMSUBlock",
    "WindowAttention3D",
    "SwinBlock3D",
    "PatchMerging3D",
    "SwinStage3D",
    "effective_window",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


class DACB(nn.Module):
    """Dilated feature Aggregator Convolutional Block (GLIMS, arXiv 2404.17854, Sec. 3.1).

    Three parallel depth-wise 3x3x3 convolutions with dilations ``d`` in (1, 2, 3), each followed by a per-channel
    GroupNorm and a PReLU, give ``Z_d``; they are concatenated, embedded by a point-wise convolution and projected
    back to the input width by a second point-wise convolution, added to the input, then normalised:

    ``Z_d = PReLU(GN(DWConv_d(x)))``,
    ``y = PReLU(IN(PW_2(PW_1([Z_1, Z_2, Z_3])) + x))``.

    The shape is preserved. The embedding width of ``PW_1`` is ``round(embed_ratio * channels)`` (the paper and the
    description do not give it; 2.5 is the ratio that reproduces the reference FLOPs, see :class:`GLIMS`).

    Args:
        channels: number of input (= output) channels.
        embed_ratio: embedding width of the first point-wise convolution, relative to ``channels``.
        dilations: dilation of each depth-wise branch.
        kernel_size: kernel size of the depth-wise convolutions.
    """

    def __init__(
        self, channels: int, embed_ratio: float = 2.5, dilations: Sequence[int] = (1, 2, 3), kernel_size: int = 3
    ) -> None:
        super().__init__()
        embed_channels = max(1, int(round(channels * embed_ratio)))
        self.branches = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(
                        channels,
                        channels,
                        kernel_size,
                        padding=d * (kernel_size // 2),
                        dilation=d,
                        groups=channels,
                    ),
                    nn.GroupNorm(channels, channels),
                    nn.PReLU(),
                )
                for d in dilations
            ]
        )
        self.embed = nn.Conv3d(len(dilations) * channels, embed_channels, kernel_size=1)
        self.project = nn.Conv3d(embed_channels, channels, kernel_size=1)
        self.norm = nn.InstanceNorm3d(channels)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: List[torch.Tensor] = []
        for branch in self.branches:
            feats.append(branch(x))
        y = self.project(self.embed(torch.cat(feats, dim=1)))
        return self.act(self.norm(y + x))


class DMSFBlock(nn.Module):
    """Down-sampling encoder stage of GLIMS (DMSF, arXiv 2404.17854, Sec. 3.1).

    Two :class:`DACB` at the input width, then a 2x2x2 stride-2 convolution that halves the resolution and
    changes the width: ``s = DACB(DACB(x))``, ``y = Conv_{2x2x2, s=2}(s)``. Returns ``(s, y)``; ``s`` is the skip.

    Args:
        in_channels: width of the stage (and of the skip).
        out_channels: width after down-sampling.
        embed_ratio: see :class:`DACB`.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_ratio: float = 2.5) -> None:
        super().__init__()
        self.dacb1 = DACB(in_channels, embed_ratio)
        self.dacb2 = DACB(in_channels, embed_ratio)
        self.down = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = self.dacb2(self.dacb1(x))
        return skip, self.down(skip)


class CSAB(nn.Module):
    """Channel and Spatial-wise Attention Block (GLIMS, arXiv 2404.17854, Sec. 3.3), applied to a skip.

    Two attention maps are computed in parallel from max- and average-pooled features and both multiply the input
    (CBAM's gates, Woo et al. 2018, in the parallel arrangement of the paper):

    ``M_c = sigmoid(MLP(AvgPool_s(x)) + MLP(MaxPool_s(x)))`` with a weight-shared MLP ``C -> C/r -> C``,
    ``M_s = sigmoid(Conv_{k^3}([Mean_c(x), Max_c(x)]))``,
    ``y = x * M_c * M_s``.

    ``spatial_kernel_size`` is 1 by default (the FLOP budget of the reference GLIMS leaves no room for CBAM's 7^3
    kernel, see :class:`~medseg_nets.nets.glims.GLIMS`); 7 gives CBAM's spatial gate.

    Args:
        channels: number of channels.
        reduction: MLP reduction ratio ``r``; the hidden width is ``max(channels // reduction, min_hidden)``.
        min_hidden: smallest hidden width of the MLP.
        spatial_kernel_size: kernel size of the spatial-attention convolution.
    """

    def __init__(
        self, channels: int, reduction: int = 16, min_hidden: int = 8, spatial_kernel_size: int = 1
    ) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.mlp = nn.Sequential(
            nn.Conv3d(channels, hidden, kernel_size=1), nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1)
        )
        self.spatial = nn.Conv3d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2)

    def attention_maps(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the channel gate ``(B, C, 1, 1, 1)`` and the spatial gate ``(B, 1, D, H, W)``, both in (0, 1)."""
        avg = torch.mean(x, dim=(2, 3, 4), keepdim=True)
        mx = torch.amax(x, dim=(2, 3, 4), keepdim=True)
        channel_gate = torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        spatial_gate = torch.sigmoid(self.spatial(pooled))
        return channel_gate, spatial_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_gate, spatial_gate = self.attention_maps(x)
        return x * channel_gate * spatial_gate


class DMSUBlock(nn.Module):
    """Up-sampling decoder stage of GLIMS (DMSU, arXiv 2404.17854, Sec. 3.4).

    ``u = IN(ConvT_{2x2x2, s=2}(x))``, ``y = DACB(DACB(Conv_{1x1x1}([u, skip])))``.

    Args:
        in_channels: width of the deeper feature map.
        out_channels: width of the skip and of the output.
        embed_ratio: see :class:`DACB`.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_ratio: float = 2.5) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.up_norm = nn.InstanceNorm3d(out_channels)
        self.fuse = nn.Conv3d(2 * out_channels, out_channels, kernel_size=1)
        self.dacb1 = DACB(out_channels, embed_ratio)
        self.dacb2 = DACB(out_channels, embed_ratio)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = self.up_norm(self.up(x))
        y = self.fuse(torch.cat([u, skip], dim=1))
        return self.dacb2(self.dacb1(y))


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


def relative_position_index(window: List[int], max_window: List[int], device: torch.device) -> torch.Tensor:
    """Index ``(n, n)`` into a ``(2M_d-1)(2M_h-1)(2M_w-1)`` relative position bias table for a window ``window``
    (each axis at most ``max_window``): ``idx = dd (2M_h-1)(2M_w-1) + dh (2M_w-1) + dw`` with ``dx = x_i - x_j + M-1``.
    """
    n = window[0] * window[1] * window[2]
    t = torch.arange(n, device=device)
    cd = torch.div(t, window[1] * window[2], rounding_mode="floor")
    ch = torch.remainder(torch.div(t, window[2], rounding_mode="floor"), window[1])
    cw = torch.remainder(t, window[2])
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
        window_size: nominal window ``M`` per axis; smaller windows index the same table.
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
    """Two-layer MLP of a Swin block: ``Linear(C, rC) -> GELU -> Linear(rC, C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


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
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, window: List[int], shifts: List[int], rel_index: torch.Tensor, mask: Optional[torch.Tensor]
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


class PatchMerging3D(nn.Module):
    """Patch merging (Swin, arXiv 2103.14030, Sec. 3.3), 3D: concatenate each 2x2x2 neighbourhood (8C), ``LN``,
    ``Linear(8C, 2C)`` without bias; channels-first in and out, ``(B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        parts: List[torch.Tensor] = []
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    parts.append(x[:, i::2, j::2, k::2, :])
        y = self.reduction(self.norm(torch.cat(parts, dim=-1)))
        return y.permute(0, 4, 1, 2, 3).contiguous()


class SwinStage3D(nn.Module):
    """A stage of ``depth`` :class:`SwinBlock3D` (alternating regular and shifted windows) on a channels-first map.

    ``(B, C, D, H, W) -> (B, C, D, H, W)``; the window is clamped per axis to the map size, the relative position
    index and the shifted-window mask are built for the actual window.

    Args:
        dim: width.
        depth: number of blocks.
        num_heads: number of attention heads.
        window_size: nominal window per axis.
        mlp_ratio: hidden width of the MLPs relative to ``dim``.
        qkv_bias: learnable bias of the query/key/value projections.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int] = (7, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.window_size: List[int] = [int(s) for s in window_size]
        self.blocks = nn.ModuleList(
            [SwinBlock3D(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias) for i in range(depth)]
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [int(x.shape[2]), int(x.shape[3]), int(x.shape[4])]
        window, _ = effective_window(dims, self.window_size, False)
        _, shifts = effective_window(dims, self.window_size, True)
        padded = [dims[i] + (window[i] - dims[i] % window[i]) % window[i] for i in range(3)]
        rel_index = relative_position_index(window, self.window_size, x.device)
        mask: Optional[torch.Tensor] = None
        if shifts[0] > 0 or shifts[1] > 0 or shifts[2] > 0:
            mask = shifted_window_mask(padded, window, shifts, x.device)
        no_shift = [0, 0, 0]
        y = x.permute(0, 2, 3, 4, 1).contiguous()
        for blk in self.blocks:
            y = blk(y, window, shifts if blk.shift else no_shift, rel_index, mask)
        return y.permute(0, 4, 1, 2, 3).contiguous()
