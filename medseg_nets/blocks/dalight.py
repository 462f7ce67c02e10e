# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""
Building blocks of DALight-3D:

    Mishra, Mishra & Singh, "DALight-3D: A Lightweight 3D U-Net for Brain Tumor Segmentation from
    Multi-Modal MRI", arXiv 2605.04518 (2026).

The blocks follow the authors' release configuration as summarised in ``docs/networks.md``. Every block is
written from that description; no line comes from the authors' code.

Tensors are channel-first 3D volumes ``(B, C, D, H, W)``. Blocks that take an ``identifier`` expect either
``None`` or an already validated integer tensor of shape ``(B,)`` or ``(1,)`` with values in
``[-1, num_identifiers)`` (``-1`` = no identifier); :func:`check_identifier` does the validation once per forward
pass at the network level, so the norms themselves do not synchronise with the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import ChannelSELayer

from medseg_nets.blocks.cpu import PointwiseConv3d
from medseg_nets.blocks.depthwise import DepthwiseConv3d

__all__ = [
    "check_identifier",
    "IdentifierConditionedNorm",
    "PlainGroupNorm",
    "SeparableConv3d",
    "CrossSliceAttention",
    "DALightResBlock",
    "ConcatFusion",
    "SSFB",
]


def check_identifier(
    identifier: Optional[torch.Tensor], batch_size: int, num_identifiers: int
) -> Optional[torch.Tensor]:
    """
    Validate a per-case identifier and broadcast it to the batch.

    Args:
        identifier: ``None`` (every sample uses the learned default scale/shift), or an integer tensor of shape
            ``(B,)`` or ``(1,)`` (a 0-d tensor is treated as ``(1,)``); ``(1,)`` broadcasts to the whole batch,
            which is what MONAI's sliding-window inferer needs (it forwards the same kwargs for every batch of
            windows). Values in ``[0, num_identifiers)`` select an identifier, ``-1`` means "none".
        batch_size: the batch size ``B`` of the image tensor.
        num_identifiers: size of the identifier table.

    Returns:
        ``None`` or a ``torch.long`` tensor of shape ``(B,)``.

    Raises:
        ValueError: when the tensor is not an integer tensor, has the wrong shape, or holds a value outside
            ``[-1, num_identifiers)``.
    """
    if identifier is None:
        return None
    if identifier.is_floating_point() or identifier.is_complex() or identifier.dtype == torch.bool:
        raise ValueError(f"identifier must be an integer tensor, got dtype {identifier.dtype}.")
    if identifier.dim() == 0:
        identifier = identifier.reshape(1)
    if identifier.dim() != 1 or (identifier.shape[0] != 1 and identifier.shape[0] != batch_size):
        raise ValueError(
            f"identifier must have shape ({batch_size},) or (1,) for a batch of {batch_size}, "
            f"got shape {list(identifier.shape)}."
        )
    identifier = identifier.long()
    low = int(identifier.min())
    high = int(identifier.max())
    if low < -1 or high >= num_identifiers:
        raise ValueError(
            f"identifier values must lie in [-1, {num_identifiers}) (-1 = none, 0..{num_identifiers - 1} = "
            f"identifiers), got values in [{low}, {high}]."
        )
    if identifier.shape[0] != batch_size:
        identifier = identifier.expand(batch_size)
    return identifier


class IdentifierConditionedNorm(nn.Module):
    """
    Identifier-conditioned normalisation (ICN) of DALight-3D (Mishra et al., arXiv 2605.04518):
    a parameter-free group norm followed by a scale and shift chosen by a per-case identifier (site, scanner):

    .. math::

        y = \\gamma_{id} \\odot \\mathrm{GN}_G(x) + \\beta_{id}, \\qquad
        (\\gamma_{id}, \\beta_{id}) = \\begin{cases} E[id] & id \\in \\{0, \\dots, K-1\\} \\\\
        (\\gamma_0, \\beta_0) & id = -1 \\text{ or no identifier} \\end{cases}

    where ``E`` is a ``K x 2C`` embedding table (first ``C`` columns the scales, last ``C`` the shifts) and
    ``(gamma_0, beta_0)`` a learned default. Both are initialised to scale 1 and shift 0, so at initialisation
    ICN equals ``GroupNorm(G, C)`` and every identifier gives the same output.

    Args:
        num_channels: number of channels ``C``.
        num_identifiers: size ``K`` of the identifier table.
        num_groups: groups ``G`` of the group norm.
        eps: group-norm epsilon.
    """

    def __init__(self, num_channels: int, num_identifiers: int = 8, num_groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        if num_identifiers < 1:
            raise ValueError(f"num_identifiers must be >= 1, got {num_identifiers}.")
        self.num_channels = num_channels
        self.num_identifiers = num_identifiers
        self.norm = nn.GroupNorm(num_groups, num_channels, eps=eps, affine=False)
        self.embedding = nn.Embedding(num_identifiers, 2 * num_channels)
        self.default_scale = nn.Parameter(torch.ones(num_channels))
        self.default_shift = nn.Parameter(torch.zeros(num_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.embedding.weight[:, : self.num_channels].fill_(1.0)
            self.embedding.weight[:, self.num_channels :].fill_(0.0)
            self.default_scale.fill_(1.0)
            self.default_shift.fill_(0.0)

    def forward(self, x: torch.Tensor, identifier: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: ``(B, C, *spatial)``.
            identifier: ``None`` or a validated long tensor ``(B,)`` / ``(1,)`` with values in ``[-1, K)``
                (see :func:`check_identifier`).
        """
        x = self.norm(x)
        shape = [x.shape[0], self.num_channels] + [1] * (x.dim() - 2)
        if identifier is None:
            scale = self.default_scale.view([1, self.num_channels] + [1] * (x.dim() - 2))
            shift = self.default_shift.view([1, self.num_channels] + [1] * (x.dim() - 2))
            return x * scale + shift
        if identifier.shape[0] != x.shape[0]:
            identifier = identifier.expand(x.shape[0])
        table = self.embedding(identifier.clamp(min=0))  # (B, 2C)
        use_table = (identifier >= 0).unsqueeze(1)  # (B, 1)
        scale = torch.where(use_table, table[:, : self.num_channels], self.default_scale.unsqueeze(0))
        shift = torch.where(use_table, table[:, self.num_channels :], self.default_shift.unsqueeze(0))
        return x * scale.view(shape) + shift.view(shape)


class PlainGroupNorm(nn.Module):
    """
    Affine group norm (Wu & He, ECCV 2018) with the call signature of :class:`IdentifierConditionedNorm`; the
    identifier is ignored. It is the norm of the "without ICN" ablation of DALight-3D (Mishra et al.,
    arXiv 2605.04518):

    .. math::

        y = \\gamma \\odot \\mathrm{GN}_G(x) + \\beta

    Args:
        num_channels: number of channels ``C``.
        num_groups: number of groups ``G``.
        eps: group-norm epsilon.
    """

    def __init__(self, num_channels: int, num_groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor, identifier: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.norm(x)


class SeparableConv3d(nn.Module):
    """
    Depth-wise separable 3D convolution as used in DALight-3D (Mishra et al., arXiv 2605.04518), after
    Chollet, "Xception", CVPR 2017: a depth-wise ``k x k x k`` convolution (one filter per channel) followed by a
    point-wise ``1 x 1 x 1`` convolution, both without bias:

    .. math::

        y_o = \\sum_i W^{pw}_{o,i} \\, (w^{dw}_i * x_i)

    Parameters: ``C_in k^3 + C_in C_out`` instead of ``C_in C_out k^3``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: depth-wise kernel size (padding keeps the spatial size).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = DepthwiseConv3d(in_channels, kernel_size, bias=False)
        self.pointwise = PointwiseConv3d(in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class CrossSliceAttention(nn.Module):
    """
    Cross-slice attention (CSA) of DALight-3D (Mishra et al., arXiv 2605.04518): self-attention among the slices
    of a volume, computed on slice descriptors and added back to every voxel of the slice.

    With ``s = mean_{H,W}(x)`` the ``C x D`` sequence of slice descriptors (for the default ``slice_axis=0``),

    .. math::

        Q = W_q s,\\; K = W_k s \\in \\mathbb{R}^{m \\times D},\\quad V = W_v s \\in \\mathbb{R}^{C \\times D},\\quad
        A = \\mathrm{softmax}_j\\!\\left(\\frac{Q^\\top K}{\\sqrt{m}}\\right),\\quad
        y_{c,d,h,w} = x_{c,d,h,w} + (V A)_{c,d} = x_{c,d,h,w} + \\sum_i V_{c,i} A_{i,d}

    The attended term is ``V A`` as in the paper's equation (``CSA(x) = x + Broadcast(W_o V A)``, without the
    ``W_o`` that neither the authors' release code nor its parameter count has) and in the authors' code: the
    softmax runs over the keys ``j`` of each query row ``i``, and slice ``d`` receives ``sum_i A[i, d] V[:, i]``,
    i.e. it is weighted by the attention *it receives* (a column of ``A``), not by the row of its own query as in
    the usual ``softmax(QK^T) V``. Checked against the authors' outputs (``tests/test_convert_dalight3d_emcad.py``).

    with ``m = max(C / reduction, min_channels)`` and ``W_q, W_k, W_v`` kernel-1 1D convolutions with bias.
    The added term is constant along the two pooled axes.

    Args:
        channels: number of channels ``C``.
        reduction: query/key reduction (``m = max(C // reduction, min_channels)``).
        min_channels: lower bound of the query/key width.
        slice_axis: the spatial axis along which slices are attended (0 = ``D``, the first spatial axis, as in
            the reference; 1 = ``H``; 2 = ``W``). The two other spatial axes are pooled.
    """

    def __init__(self, channels: int, reduction: int = 4, min_channels: int = 8, slice_axis: int = 0) -> None:
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of a 3D volume), got {slice_axis}.")
        self.key_channels = max(channels // reduction, min_channels)
        self.scale = 1.0 / math.sqrt(self.key_channels)
        self.slice_dim = 2 + slice_axis
        self.pool_dims = [d for d in (2, 3, 4) if d != self.slice_dim]
        self.query = nn.Conv1d(channels, self.key_channels, 1)
        self.key = nn.Conv1d(channels, self.key_channels, 1)
        self.value = nn.Conv1d(channels, channels, 1)

    def attended(self, x: torch.Tensor) -> torch.Tensor:
        """The term added to ``x``: ``(B, C, D)`` attended slice values (before broadcasting)."""
        s = x.mean(dim=self.pool_dims)  # (B, C, D)
        q = self.query(s)  # (B, m, D)
        k = self.key(s)  # (B, m, D)
        v = self.value(s)  # (B, C, D)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # (B, D, D), rows = queries
        return torch.bmm(v, attn.to(v.dtype))  # (B, C, D): V A, as the paper and the authors' code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attended(x)
        for d in self.pool_dims:  # ascending: restores the pooled axes as singletons
            out = out.unsqueeze(d)
        return x + out.to(x.dtype)


class DALightResBlock(nn.Module):
    """
    Residual block of DALight-3D (Mishra et al., arXiv 2605.04518):

    .. math::

        h = \\mathrm{SE}(\\mathrm{N}_2(\\mathrm{conv}_2(\\mathrm{GELU}(\\mathrm{N}_1(\\mathrm{conv}_1(x)))))),\\quad
        y = \\mathrm{GELU}(\\mathrm{CSA}(h) + \\mathrm{proj}(x))

    ``conv`` is a full ``3x3x3`` convolution or a :class:`SeparableConv3d` (both bias-free), ``N`` an
    :class:`IdentifierConditionedNorm` (or a plain affine ``GroupNorm`` when ``use_icn=False``), SE the channel
    squeeze-and-excitation of Hu et al. (CVPR 2018; MONAI's ``ChannelSELayer``: avg-pool, Linear C->C/r, GELU (as
    the authors' code), Linear C/r->C, sigmoid, multiply), CSA the optional :class:`CrossSliceAttention`, and
    ``proj = GroupNorm(conv_1x1x1(x))`` (bias-free conv, affine GroupNorm) when the widths differ, identity
    otherwise.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        separable: separable convs (True) or full ``3x3x3`` convs (False).
        use_csa: append cross-slice attention after SE.
        use_icn: identifier-conditioned norms (True) or plain ``GroupNorm(num_groups)`` with affine (False).
        num_identifiers: size of the ICN identifier table.
        se_reduction: SE reduction ratio.
        num_groups: groups of every group norm.
        slice_axis: spatial axis of the cross-slice attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        separable: bool = True,
        use_csa: bool = False,
        use_icn: bool = True,
        num_identifiers: int = 8,
        se_reduction: int = 4,
        num_groups: int = 8,
        slice_axis: int = 0,
    ) -> None:
        super().__init__()
        self.use_icn = use_icn
        if separable:
            self.conv1: nn.Module = SeparableConv3d(in_channels, out_channels)
            self.conv2: nn.Module = SeparableConv3d(out_channels, out_channels)
        else:
            self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
            self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        if use_icn:
            self.norm1: nn.Module = IdentifierConditionedNorm(out_channels, num_identifiers, num_groups)
            self.norm2: nn.Module = IdentifierConditionedNorm(out_channels, num_identifiers, num_groups)
        else:
            self.norm1 = PlainGroupNorm(out_channels, num_groups)
            self.norm2 = PlainGroupNorm(out_channels, num_groups)
        self.act = nn.GELU()
        self.se = ChannelSELayer(3, out_channels, r=se_reduction, acti_type_1="gelu")
        self.csa: nn.Module = (
            CrossSliceAttention(out_channels, slice_axis=slice_axis) if use_csa else nn.Identity()
        )
        self.proj: nn.Module = (
            nn.Sequential(
                PointwiseConv3d(in_channels, out_channels, bias=False), nn.GroupNorm(num_groups, out_channels)
            )
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, identifier: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x), identifier))
        out = self.se(self.norm2(self.conv2(out), identifier))
        out = self.csa(out)
        return self.act(out + self.proj(x))


class ConcatFusion(nn.Module):
    """
    Plain U-Net skip fusion (used at the deepest decoder level of DALight-3D, Mishra et al.,
    arXiv 2605.04518, at every level when SSFB is switched off, and as the last step of :class:`SSFB`):

    .. math::

        y = \\mathrm{GELU}(\\mathrm{GN}(\\mathrm{conv}_{3\\times3\\times3}([s, u])))

    with ``s`` the encoder skip, ``u`` the upsampled decoder map, ``[.,.]`` channel concatenation and a bias-free
    convolution ``2C -> C``. The authors' code puts the skip first in the plain fusion (``SimpleSkip``) and the
    decoder map first inside SSFB (``[f_dec; m]``, as the paper's SSFB equation): ``decoder_first`` selects the
    order.

    Args:
        channels: width ``C`` of both inputs and of the output.
        num_groups: groups of the group norm.
        decoder_first: concatenate ``[u, s]`` instead of ``[s, u]``.
    """

    def __init__(self, channels: int, num_groups: int = 8, decoder_first: bool = False) -> None:
        super().__init__()
        self.decoder_first = decoder_first
        self.conv = nn.Conv3d(2 * channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = nn.GELU()

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        pair = [decoder, skip] if self.decoder_first else [skip, decoder]
        return self.act(self.norm(self.conv(torch.cat(pair, dim=1))))


class SSFB(nn.Module):
    """
    Skip and spatial feature blend (SSFB) of DALight-3D (Mishra et al., arXiv 2605.04518). The encoder skip ``s`` is
    refined by two branches conditioned on the upsampled decoder map ``u``, blended by a learned sigmoid weight,
    then fused with ``u`` as in :class:`ConcatFusion` (decoder map first). As the authors' release code (the
    paper gives the equations at the level of ``W_out (V A)``; every detail below was checked against the
    authors' outputs):

    - low-rank attention branch (rank ``r``, ``N`` = voxels, ``tau = r^{-1/2}``; queries from the decoder, keys
      and values from the skip; no residual)

      .. math::

          Q = \\mathrm{softmax}_{N}(\\tau W_q u),\\;
          K = \\mathrm{softmax}_{r}(\\tau W_k s) \\in \\mathbb{R}^{r \\times N},\\;
          V = W_v s \\in \\mathbb{R}^{C \\times N},\\quad a = W_o \\big((V K^\\top) Q\\big)

      (the queries are normalised over the voxels and the keys over the rank: the reverse of Shen et al.'s
      "efficient attention", WACV 2021, which it otherwise resembles)

    - channel gate (an MLP over the pooled decoder and skip features)

      .. math::

          g = \\sigma(W_2\\,\\mathrm{GELU}(W_1 [\\bar u, \\bar s] + b_1) + b_2),\\quad c = g \\odot s

    - blend and fuse

      .. math::

          m = \\sigma(\\alpha)\\, a + (1 - \\sigma(\\alpha))\\, c,\\qquad
          y = \\mathrm{GELU}(\\mathrm{GN}(\\mathrm{conv}_{3\\times3\\times3}([u, m])))

    ``W_q, W_k`` (C->r), ``W_v, W_o`` (C->C) are 1x1x1 convolutions with bias; the gate's hidden width is
    ``max(C // gate_reduction, min_hidden)``; ``alpha`` is a scalar initialised to 0.5 (as the authors).

    Args:
        channels: width ``C`` of the skip and decoder maps.
        rank: attention rank ``r``.
        gate_reduction: reduction of the channel-gate MLP.
        min_hidden: lower bound of the channel-gate hidden width.
        num_groups: groups of the group norm of the fusion conv.
    """

    def __init__(
        self, channels: int, rank: int = 8, gate_reduction: int = 4, min_hidden: int = 8, num_groups: int = 8
    ) -> None:
        super().__init__()
        hidden = max(channels // gate_reduction, min_hidden)
        self.scale = float(rank) ** -0.5
        self.query = PointwiseConv3d(channels, rank)
        self.key = PointwiseConv3d(channels, rank)
        self.value = PointwiseConv3d(channels, channels)
        self.out = PointwiseConv3d(channels, channels)
        self.gate = nn.Sequential(nn.Linear(2 * channels, hidden), nn.GELU(), nn.Linear(hidden, channels), nn.Sigmoid())
        self.blend = nn.Parameter(torch.tensor([0.5]))
        self.fuse = ConcatFusion(channels, num_groups, decoder_first=True)

    def attention(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Low-rank attention branch ``a`` (same shape as ``skip``)."""
        q = torch.softmax(self.query(decoder).flatten(2).float() * self.scale, dim=2)  # (B, r, N), over the voxels
        k = torch.softmax(self.key(skip).flatten(2).float() * self.scale, dim=1)  # (B, r, N), over the rank
        v = self.value(skip).flatten(2)  # (B, C, N)
        context = torch.bmm(v, k.transpose(1, 2).to(v.dtype))  # (B, C, r)
        att = torch.bmm(context, q.to(context.dtype)).view(skip.shape)  # (B, C, *spatial)
        return self.out(att)

    def channel_gate(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Channel gate ``g`` in (0, 1), shape ``(B, C)``."""
        pooled = torch.cat([decoder.mean(dim=[2, 3, 4]), skip.mean(dim=[2, 3, 4])], dim=1)
        return self.gate(pooled)

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gate = self.channel_gate(decoder, skip)
        gated = skip * gate.view(gate.shape[0], gate.shape[1], 1, 1, 1)
        w = torch.sigmoid(self.blend)
        refined = w * self.attention(decoder, skip) + (1.0 - w) * gated
        return self.fuse(decoder, refined)
