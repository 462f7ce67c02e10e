"""Building blocks of EAM-Net.

EAM-Net: "Effective Attention-Guided Multi-Scale Medical Network for Skin Lesion Segmentation",
Wang et al., BIBM 2025, arXiv 2512.07275.

No reference code or full text of EAM-Net is available: every block below is built from the paper's summary and
from the public designs it names, and each docstring says which choices are ours. The borrowed designs are:

- External attention: Guo et al., "Beyond Self-attention: External Attention using Two Linear Layers for Visual
  Tasks" (EANet), arXiv 2105.02358.
- Cheap depth-wise "ghost" operations: Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020,
  arXiv 1911.11907.
- Spatial and channel gates: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018,
  arXiv 1807.06521.
- Transposed (channel-wise) attention with L2-normalised queries/keys and a learnable temperature:
  Zamir et al., "Restormer", CVPR 2022, arXiv 2111.09881.

The design rationale, with the reason for each open choice, is collected in the bundle's model card
(``docs_drafts/eamnet_design.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvBNAct",
    "ResidualBlock",
    "MRCF",
    "ExternalAttention",
    "TopKChannelSelect",
    "ExternalAttentionBridge",
    "ChannelGate",
    "SpatialGate",
    "CMAM",
    "EAMDecoderBlock",
    "MultiScaleFusionHead",
]


class ConvBNAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` (the activation is optional).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size; padding keeps the spatial size (``dilation * (kernel_size - 1) // 2``).
        dilation: convolution dilation.
        groups: convolution groups (``groups == in_channels == out_channels`` gives a depth-wise conv).
        act: append a ReLU when True.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=dilation * (kernel_size - 1) // 2,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """The encoder/decoder "Res-Block" of EAM-Net: a ResNet basic block (He et al., CVPR 2016).

    ``y = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``, where the shortcut is the identity when the
    widths match and ``BN(conv1x1(x))`` otherwise. The EAM-Net summary names only "residual blocks"; the basic
    (two 3x3 convs) form is our choice, as the plainest one.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, act=False)
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else ConvBNAct(in_channels, out_channels, 1, act=False)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class MRCF(nn.Module):
    """Multi-Resolution multi-Channel Fusion (MRCF) of EAM-Net, with GhostNet-style cheap operations.

    The input channels are split into ``len(dilations) + 1`` equal groups ``x_0, x_1, ..., x_n``. ``x_0`` is kept
    as it is ("raw features"); every other group goes through a cheap operation in the GhostNet sense, a
    depth-wise 3x3 convolution (here dilated, rates 3/5/7 by default) with BN and ReLU. The groups are concatenated
    and fused by a 1x1 convolution with BN, added to the input and activated:

        ``m = concat(x_0, DW_{d_1}(x_1), ..., DW_{d_n}(x_n))``
        ``y = ReLU(x + BN(conv1x1(m)))``

    Choices not fixed by the EAM-Net summary: the branches are parallel (not cascaded as in Res2Net), each branch
    is a single depth-wise conv (GhostNet's cheap op; the 1x1 fusion supplies the cross-channel mixing), and the
    residual add keeps the module an easy-to-train refinement of the residual block before it.

    Args:
        channels: input and output channels; must be divisible by ``len(dilations) + 1``.
        dilations: dilation rate of each transformed group (EAM-Net: 3, 5, 7).
    """

    def __init__(self, channels: int, dilations: Sequence[int] = (3, 5, 7)) -> None:
        super().__init__()
        groups = len(dilations) + 1
        if channels % groups != 0:
            raise ValueError(f"MRCF needs channels divisible by {groups}, got {channels}.")
        self.group_width = channels // groups
        g = self.group_width
        self.branches = nn.ModuleList([ConvBNAct(g, g, 3, dilation=int(d), groups=g) for d in dilations])
        self.fuse = ConvBNAct(channels, channels, 1, act=False)
        self.act = nn.ReLU(inplace=True)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenation ``m`` before the 1x1 fusion (the first group is passed through unchanged)."""
        chunks = torch.split(x, self.group_width, dim=1)
        outs = [chunks[0]]
        for i, branch in enumerate(self.branches):
            outs.append(branch(chunks[i + 1]))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.fuse(self.mix(x)))


class ExternalAttention(nn.Module):
    """External attention (EANet, Guo et al., arXiv 2105.02358), as used in EAM-Net's External Attention Bridge.

    With ``F`` the ``N x C`` features (``N = H * W`` positions) after a 1x1 input projection, and two learnable,
    input-independent memories ``M_k`` (``S x C``) and ``M_v`` (``S x C``) implemented as linear layers without
    bias:

        ``A~ = F M_k^T``                                   (``N x S``)
        ``A^_{i,j} = exp(A~_{i,j}) / sum_i exp(A~_{i,j})``   (softmax over the positions ``i``)
        ``A_{i,j} = A^_{i,j} / sum_j A^_{i,j}``             (L1 over the memory slots ``j``: "double normalisation")
        ``F_out = BN(conv1x1(A M_v))``

    as in EANet's segmentation head (input 1x1 conv, no-bias memories, output 1x1 conv + BN). The residual add and
    activation live in :class:`ExternalAttentionBridge`, after the channel selection.

    Args:
        channels: input and output channels ``C``.
        memory_size: number of memory slots ``S`` (EANet's segmentation default: 64).
        eps: guard of the L1 normalisation (EANet: 1e-9).
    """

    def __init__(self, channels: int, memory_size: int = 64, eps: float = 1e-9) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.memory_key = nn.Conv1d(channels, memory_size, 1, bias=False)  # M_k
        self.memory_value = nn.Conv1d(memory_size, channels, 1, bias=False)  # M_v
        self.proj_out = ConvBNAct(channels, channels, 1, act=False)
        self.eps = eps

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The doubly normalised attention map ``A``, shape ``(B, S, H * W)``; it sums to one over ``S``."""
        attn = self.memory_key(torch.flatten(self.proj_in(x), 2))  # (B, S, N)
        attn = torch.softmax(attn, dim=-1)  # over positions
        return attn / (self.eps + attn.sum(dim=1, keepdim=True))  # L1 over memory slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.memory_value(self.attention(x)).reshape(b, c, h, w)
        return self.proj_out(out)


class TopKChannelSelect(nn.Module):
    """Keep the ``k`` channels of largest L1 norm, per sample; zero the others (EAM-Net's EAB channel selection).

    ``score_{b,c} = sum_{h,w} |x_{b,c,h,w}|``; ``mask_{b,c} = 1`` for the ``k`` largest scores of sample ``b``,
    else 0; ``y = x * mask``. The width stays fixed (so the decoder sees a constant channel count), the dropped
    channels are exactly zero. ``k = clamp(round(ratio * channels), 1, channels)``.

    With ``straight_through=True`` the backward pass treats the mask as the identity (straight-through
    estimator, Bengio et al. 2013): ``y = x * mask + (x - x.detach()) * (1 - mask)``, equal to ``x * mask`` in
    value. Without it, a channel that is not selected gets no gradient through this path, so a channel that starts
    small can never grow into the top-k ("dead" channels). Only used in training mode.

    Args:
        channels: number of input channels.
        ratio: fraction of channels kept.
        straight_through: use the straight-through gradient in training mode.
    """

    def __init__(self, channels: int, ratio: float = 0.5, straight_through: bool = True) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
        self.k = min(channels, max(1, int(round(ratio * channels))))
        self.straight_through = straight_through

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, C, 1, 1)`` binary mask of the ``k`` channels with the largest L1 norm."""
        scores = x.detach().abs().sum(dim=(2, 3))
        idx = torch.topk(scores, self.k, dim=1).indices
        return torch.zeros_like(scores).scatter_(1, idx, 1.0)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask(x)
        if self.straight_through and self.training:
            return x * mask + (x - x.detach()) * (1.0 - mask)
        return x * mask


class ExternalAttentionBridge(nn.Module):
    """External Attention Bridge (EAB) of EAM-Net, placed on each encoder-decoder skip connection.

    ``y = ReLU(x + TopK(EA(x)))``: the skip ``x`` is kept whole and the external-memory read-out ``EA(x)``
    (:class:`ExternalAttention`) is added as a compensation for what the skip loses, after the selection of its
    ``k`` channels of largest L1 norm (:class:`TopKChannelSelect`). EAM-Net's summary places the top-k
    selection after the external attention; applying it to the compensation term rather than to the skip itself
    is our choice, so that no encoder channel is ever cut from the decoder.

    Args:
        channels: skip width.
        memory_size: external memory slots ``S``.
        topk_ratio: fraction of channels of the memory read-out kept.
        straight_through: straight-through gradient of the top-k mask in training.
    """

    def __init__(
        self, channels: int, memory_size: int = 64, topk_ratio: float = 0.5, straight_through: bool = True
    ) -> None:
        super().__init__()
        self.attention = ExternalAttention(channels, memory_size)
        self.select = TopKChannelSelect(channels, topk_ratio, straight_through)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.select(self.attention(x)))


class ChannelGate(nn.Module):
    """CBAM channel attention (Woo et al., arXiv 1807.06521): "what" to look at.

    ``y = x * sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))``, the MLP a shared 1x1 bottleneck ``C -> C/r -> C``.

    Args:
        channels: channels ``C``.
        reduction: bottleneck ratio ``r`` (hidden width at least 4).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialGate(nn.Module):
    """CBAM spatial attention (Woo et al., arXiv 1807.06521): "where" to look.

    ``y = x * sigmoid(BN(conv_kxk([mean_c(x), max_c(x)])))``.

    Args:
        kernel_size: size of the gate convolution (CBAM: 7).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = ConvBNAct(2, 1, kernel_size, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class CMAM(nn.Module):
    """Cross-Mix Attention Module (CMAM) of EAM-Net, applied at every decoder fusion.

    From the fused feature ``x`` two views are formed: ``X_s = SpatialGate(x)`` and ``X_c = ChannelGate(x)``
    (CBAM's two gates, which a serial or parallel CBAM would chain or sum). CMAM instead cross-mixes them, with
    queries from one view and keys/values from the other, in both directions, and sums the two results:

        ``SA = softmax(Q_s K_c^T / sqrt(C)) V_c``   attention over positions (``N x M``), ``Q`` from ``X_s``
        ``CA = softmax(t * Q^_c K^_s^T) V_s``       attention over channels (``C x C``), ``Q`` from ``X_c``
        ``y  = ReLU(x + BN(conv1x1(SA + CA)))``

    All projections are 1x1 convs without bias. Choices not fixed by the EAM-Net summary:

    - the spatial direction attends over positions, the channel direction over channels (so "spatial" and
      "channel" name both the view the queries come from and the axis attended over);
    - the keys/values of the spatial direction are average-pooled to a fixed ``pool_size x pool_size`` grid
      (``M`` tokens), as in PVTv2-Li's linear spatial-reduction attention (adaptive pooling to 7x7 at 224 input;
      8x8 is its analogue at 256), so the cost stays linear in ``N``; full ``N x N`` attention at 256x256 would
      need a 65536^2 map;
    - the channel direction uses L2-normalised queries/keys and a learnable temperature ``t`` (Restormer's
      transposed attention), since a ``1/sqrt(N)`` scale would vary with the input size;
    - a single head (the widths are small: 24 channels at full resolution), and a residual add so the fused
      feature always passes through and the cross-mixed attention acts as a refinement of it.

    Args:
        channels: channels ``C``.
        reduction: channel-gate bottleneck ratio.
        spatial_kernel: spatial-gate kernel size.
        pool_size: side of the pooled key/value grid of the spatial direction.
    """

    def __init__(self, channels: int, reduction: int = 8, spatial_kernel: int = 7, pool_size: int = 8) -> None:
        super().__init__()
        self.spatial_gate = SpatialGate(spatial_kernel)
        self.channel_gate = ChannelGate(channels, reduction)
        self.q_s = nn.Conv2d(channels, channels, 1, bias=False)
        self.kv_s = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.q_c = nn.Conv2d(channels, channels, 1, bias=False)
        self.kv_c = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.temperature = nn.Parameter(torch.ones(1))
        self.pool_size = pool_size
        self.proj = ConvBNAct(channels, channels, 1, act=False)
        self.act = nn.ReLU(inplace=True)

    def spatial_path(self, xs: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        """``SA``: queries from the spatial view (every position), keys/values from the pooled channel view."""
        b, c, h, w = xs.shape
        q = torch.flatten(self.q_s(xs), 2).transpose(1, 2)  # (B, N, C)
        k, v = self.kv_c(F.adaptive_avg_pool2d(xc, self.pool_size)).flatten(2).chunk(2, dim=1)  # (B, C, M) each
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=-1)  # (B, N, M)
        return torch.bmm(attn, v.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)

    def channel_path(self, xs: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        """``CA``: queries from the channel view, keys/values from the spatial view; a ``C x C`` attention."""
        b, c, h, w = xc.shape
        q = F.normalize(torch.flatten(self.q_c(xc), 2), dim=-1)  # (B, C, N)
        k, v = torch.flatten(self.kv_s(xs), 2).chunk(2, dim=1)  # (B, C, N) each
        attn = torch.softmax(torch.bmm(q, F.normalize(k, dim=-1).transpose(1, 2)) * self.temperature, dim=-1)
        return torch.bmm(attn, v).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.spatial_gate(x)
        xc = self.channel_gate(x)
        return self.act(x + self.proj(self.spatial_path(xs, xc) + self.channel_path(xs, xc)))


class EAMDecoderBlock(nn.Module):
    """One EAM-Net decoder stage: upsample, bridge the skip with the EAB, fuse, refine with CMAM.

        ``u = Up_2x(ReLU(BN(conv1x1(d))))``                 width to the skip's, then bilinear 2x upsampling
        ``f = ResidualBlock(ReLU(BN(conv1x1(concat(u, EAB(skip))))))``   1x1 fusion ``2C -> C``, then ``C -> C``
        ``y = CMAM(f)``

    Choices not fixed by the EAM-Net summary: a 1x1 conv plus bilinear upsampling (rather than a transposed
    conv), cheaper in parameters and free of checkerboard artefacts on the lesion boundary, with the conv before
    the upsampling at a quarter of the cost; the concatenation fused by a 1x1 conv (the usual "fusion") and then
    one ``C -> C`` residual block, mirroring the encoder's one residual block per level (a ``2C -> C`` residual
    block instead would add 9C^2 per stage, 0.44M in all, and overshoot the paper's 4.6M with the same widths);
    CMAM after the fusion, at width ``C`` rather than ``2C`` (a quarter of the attention cost).

    Args:
        in_channels: width of the deeper decoder (or bottleneck) feature ``d``.
        out_channels: width of the skip and of the output.
        memory_size: EAB memory slots.
        topk_ratio: EAB fraction of channels kept.
        straight_through: EAB straight-through gradient of the top-k mask.
        pool_size: CMAM pooled key/value grid side.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        memory_size: int = 64,
        topk_ratio: float = 0.5,
        straight_through: bool = True,
        pool_size: int = 8,
    ) -> None:
        super().__init__()
        self.up = ConvBNAct(in_channels, out_channels, 1)
        self.bridge = ExternalAttentionBridge(out_channels, memory_size, topk_ratio, straight_through)
        self.fuse = nn.Sequential(
            ConvBNAct(2 * out_channels, out_channels, 1), ResidualBlock(out_channels, out_channels)
        )
        self.cmam = CMAM(out_channels, pool_size=pool_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = F.interpolate(self.up(x), size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.cmam(self.fuse(torch.cat([u, self.bridge(skip)], dim=1)))


class MultiScaleFusionHead(nn.Module):
    """Multi-scale supervision head: EAM-Net's MSEF (on encoder stages) and MSDF (on decoder stages).

    Each stage feature ``f_i`` gets a 1x1 side classifier; the side logits are bilinearly upsampled to the input
    size and fused by a 1x1 conv over their concatenation (HED-style side outputs and fusion, Xie & Tu, ICCV 2015):

        ``s_i = Up(conv1x1(f_i))``,  ``y = conv1x1(concat(s_1, ..., s_n))``

    The fused map ``y`` is the head's prediction; every ``s_i`` can be supervised as well. Fusing logits rather
    than features is our choice: it adds a few hundred parameters and no full-resolution wide tensor.

    Args:
        in_channels: width of each stage, in the order the features are given.
        out_channels: output channels (classes).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.sides = nn.ModuleList([nn.Conv2d(int(c), out_channels, 1) for c in in_channels])
        self.fuse = nn.Conv2d(len(in_channels) * out_channels, out_channels, 1)

    def forward(self, features: list[torch.Tensor], size: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the fused logits and the list of side logits, all of spatial ``size``."""
        sides: list[torch.Tensor] = []
        for i, side in enumerate(self.sides):
            s = side(features[i])
            if s.shape[2] != size[0] or s.shape[3] != size[1]:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            sides.append(s)
        return self.fuse(torch.cat(sides, dim=1)), sides
