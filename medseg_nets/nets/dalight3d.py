# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""DALight-3D network (Mishra et al., arXiv 2605.04518), release configuration."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from medseg_nets.blocks.cpu import PointwiseConv3d
from medseg_nets.blocks.dalight import ConcatFusion, DALightResBlock, SSFB, check_identifier

__all__ = ["DALight3D"]


class DALight3D(nn.Module):
    """
    DALight-3D, a lightweight 3D U-Net for brain-tumour segmentation from multi-modal MRI:

        Mishra, Mishra & Singh, "DALight-3D: A Lightweight 3D U-Net for Brain Tumor Segmentation from
        Multi-Modal MRI", arXiv 2605.04518 (2026).

    Built from the description of the authors' release configuration (``docs/networks.md``); no line comes from
    the authors' code. With the defaults (4 input sequences FLAIR/T1w/T1gd/T2w, 4 classes, base 24, bottleneck
    432, SSFB rank 8, 8 identifiers) it has exactly the reference's 2,219,074 parameters (in 172 tensors) and
    75.38 / 602.99 GFLOPs at 1x4x64^3 / 1x4x128^3 (``torch.utils.flop_counter.FlopCounterMode``, 2 x MACs), as
    measured on the reference.

    Layout (``b`` = ``base_channels``, widths ``b, 2b, 4b, bottleneck`` at full, 1/2, 1/4, 1/8 resolution)::

        stem      conv3 in->b (no bias), GroupNorm(8), GELU
        enc0      block b->b          full 3x3x3 convs                    -> skip0
        down0     conv3 stride 2 b->b (bias);  enc1  block b->2b  separable -> skip1
        down1     conv3 stride 2 2b->2b (bias); enc2 block 2b->4b separable + CSA -> skip2
        down2     conv3 stride 2 4b->4b (bias); enc3 block 4b->bottleneck separable + CSA
        up2       convT 2x2x2 bottleneck->4b; concat fusion with skip2; block 4b->4b separable
        up1       convT 2x2x2 4b->2b;  SSFB with skip1;  block 2b->2b separable
        up0       convT 2x2x2 2b->b;   SSFB with skip0;  block b->b separable
        head      Dropout3d, conv3 b->64 (no bias), GroupNorm(8), GELU, conv1 64->out (bias)

    block = :class:`~medseg_nets.blocks.dalight.DALightResBlock`
    (conv -> ICN -> GELU -> conv -> ICN -> SE(4) -> [CSA] -> GELU(out + proj(x))).

    Choices made where the description is silent. The exact count, the four ablation counts and the two FLOP
    figures pin down every choice that changes a parameter or a multiply-add; the rest follow the authors' code:

    - One residual block per encoder stage and per decoder level.
    - ICN replaces the two norms inside every residual block (encoder and decoder); the stem, the projection
      shortcut, the fusion convs and the head use plain affine ``GroupNorm(8)``.
    - Convolutions followed by a norm have no bias (stem, block convs, projection, fusion convs, head 3x3x3);
      the strided down-sampling convs (as stated), the transposed convs, the final 1x1x1 conv, the SE linears,
      the CSA and SSFB projections and the SSFB gate linears have biases.
    - The learned default scale/shift of ICN are two ``(C,)`` parameters (``default_scale``, ``default_shift``);
      the identifier table is an ``nn.Embedding(num_identifiers, 2C)`` (scales then shifts).
    - SE is MONAI's ``ChannelSELayer`` (avg-pool, Linear C->C/4, GELU, Linear C/4->C, sigmoid).
    - CSA uses kernel-1 ``Conv1d`` projections with bias and no extra residual weight; it attends along the first
      spatial axis ``D`` and pools ``H, W`` (``slice_axis`` selects another axis; parameters do not change); the
      added term is ``V A`` (the paper's equation, see :class:`~medseg_nets.blocks.dalight.CrossSliceAttention`).
    - SSFB (:class:`~medseg_nets.blocks.dalight.SSFB`): rank-8 low-rank attention (queries from the upsampled
      decoder map, keys and values from the skip, scaled by ``rank^-1/2``, queries normalised over the voxels and
      keys over the rank, 1x1x1 output projection, no residual); channel gate MLP 2C -> max(C/4, 8) -> C with GELU;
      a scalar blend logit ``alpha`` (initialised to 0.5); the fusion conv takes ``[decoder, blend]``, while the
      plain fusion of the deepest level takes ``[skip, decoder]``.
    - Exact (erf) GELU everywhere; 8 groups in every group norm.

    The choices that the figures above do not pin down (activations, attention axes, concatenation order,
    initial blend) were settled against outputs of the authors' own code: with their weights converted by
    :mod:`medseg_nets.convert.dalight3d`, this network reproduces the authors' logits to about 2e-5
    (``tests/test_convert_dalight3d_emcad.py``).

    Ablations (constructor switches; "without" means):

    - ``use_csa=False``: the CSA modules of stages 2 and 3 are removed (1,924,522 parameters, "1.92M").
    - ``use_ssfb=False``: the two SSFB fusions become the plain concat fusion of the deepest level
      (2,209,588, "2.21M").
    - ``use_icn=False``: every ICN becomes an affine ``GroupNorm(8)``; the identifier is still validated but
      ignored (2,194,498, "2.19M").
    - ``separable=False``: every separable conv (stages 1-3 and the three decoder blocks) becomes a full
      bias-free 3x3x3 conv (9,198,682, "9.20M").

    Args:
        in_channels: number of input channels (MRI sequences).
        out_channels: number of output classes (logits).
        base_channels: width of the first stage; the stages are ``b, 2b, 4b, bottleneck_channels``.
        bottleneck_channels: width of the deepest (widened) stage.
        ssfb_rank: rank of the SSFB low-rank attention.
        num_identifiers: number of identifiers (sites, scanners) in the ICN tables.
        se_reduction: squeeze-excitation reduction ratio.
        dropout: channel dropout (``Dropout3d``) probability before the head.
        use_csa: cross-slice attention in stages 2 and 3.
        use_ssfb: SSFB fusion at the two shallow decoder levels (plain concat fusion otherwise).
        use_icn: identifier-conditioned norms in the residual blocks (plain GroupNorm otherwise).
        separable: depth-wise separable convs in stages 1-3 and the decoder blocks (full convs otherwise).
        head_channels: width of the head's 3x3x3 conv.
        num_groups: groups of every group norm (all widths must be divisible by it).
        slice_axis: spatial axis attended by the cross-slice attention (0 = D, the reference's; 1 = H; 2 = W).

    Example::

        net = DALight3D()
        logits = net(torch.randn(2, 4, 64, 64, 64), identifier=torch.tensor([0, -1]))  # (2, 4, 64, 64, 64)
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        base_channels: int = 24,
        bottleneck_channels: int = 432,
        ssfb_rank: int = 8,
        num_identifiers: int = 8,
        se_reduction: int = 4,
        dropout: float = 0.1,
        use_csa: bool = True,
        use_ssfb: bool = True,
        use_icn: bool = True,
        separable: bool = True,
        head_channels: int = 64,
        num_groups: int = 8,
        slice_axis: int = 0,
    ) -> None:
        super().__init__()
        widths = [base_channels, 2 * base_channels, 4 * base_channels, bottleneck_channels]
        for name, value in (("base_channels", base_channels), ("bottleneck_channels", bottleneck_channels),
                            ("head_channels", head_channels)):
            if value <= 0 or value % num_groups != 0:
                raise ValueError(f"{name} must be a positive multiple of num_groups={num_groups}, got {value}.")
        if num_identifiers < 1:
            raise ValueError(f"num_identifiers must be >= 1, got {num_identifiers}.")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0 (D), 1 (H) or 2 (W), got {slice_axis}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_identifiers = num_identifiers
        self.use_csa = use_csa
        self.use_ssfb = use_ssfb
        self.use_icn = use_icn
        self.separable = separable
        self.divisor = 8  # three stride-2 down-samplings

        def block(cin: int, cout: int, sep: bool, csa: bool) -> DALightResBlock:
            return DALightResBlock(
                cin, cout, separable=sep, use_csa=csa, use_icn=use_icn, num_identifiers=num_identifiers,
                se_reduction=se_reduction, num_groups=num_groups, slice_axis=slice_axis,
            )

        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.GroupNorm(num_groups, widths[0]),
            nn.GELU(),
        )
        # encoder: stage i = [strided conv (i > 0)] + one residual block
        self.encoder = nn.ModuleList(
            [
                block(widths[0], widths[0], False, False),
                block(widths[0], widths[1], separable, False),
                block(widths[1], widths[2], separable, use_csa),
                block(widths[2], widths[3], separable, use_csa),
            ]
        )
        # down-sampling in front of each stage (none in front of stage 0)
        self.downsample = nn.ModuleList(
            [nn.Identity()] + [nn.Conv3d(widths[i], widths[i], 3, stride=2, padding=1, bias=True) for i in range(3)]
        )
        # decoder, deepest level first: upsample -> fusion with the skip -> separable block without CSA
        self.upsample = nn.ModuleList(
            [nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2) for i in (2, 1, 0)]
        )
        self.fusion = nn.ModuleList(
            [
                ConcatFusion(widths[2], num_groups),
                SSFB(widths[1], ssfb_rank, num_groups=num_groups) if use_ssfb else ConcatFusion(widths[1], num_groups),
                SSFB(widths[0], ssfb_rank, num_groups=num_groups) if use_ssfb else ConcatFusion(widths[0], num_groups),
            ]
        )
        self.decoder = nn.ModuleList([block(widths[i], widths[i], separable, False) for i in (2, 1, 0)])
        self.head = nn.Sequential(
            nn.Dropout3d(dropout),
            nn.Conv3d(widths[0], head_channels, 3, padding=1, bias=False),
            nn.GroupNorm(num_groups, head_channels),
            nn.GELU(),
            PointwiseConv3d(head_channels, out_channels),
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"DALight3D expects a 5D input (B, C, D, H, W), got shape {list(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DALight3D expects {self.in_channels} input channels, got {x.shape[1]}.")
        spatial = [int(s) for s in x.shape[2:]]
        for s in spatial:
            if s % self.divisor != 0 or s == 0:
                raise ValueError(
                    f"DALight3D needs every spatial size (D, H, W) to be a positive multiple of {self.divisor} "
                    f"(three stride-2 down-samplings), got {spatial}."
                )

    def forward(self, x: torch.Tensor, identifier: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: image ``(B, in_channels, D, H, W)``, ``D, H, W`` multiples of 8.
            identifier: ``None`` (every sample uses ICN's learned default scale/shift) or an integer tensor of
                shape ``(B,)`` or ``(1,)`` (broadcast to the batch) with values in ``[0, num_identifiers)``
                selecting a per-identifier scale/shift, or ``-1`` for "none" (the default, sample by sample).

        Returns:
            logits ``(B, out_channels, D, H, W)``.

        Raises:
            ValueError: bad input shape, or identifier outside ``[-1, num_identifiers)`` / of a bad shape.
        """
        self._check_input(x)
        ident = check_identifier(identifier, x.shape[0], self.num_identifiers)
        if ident is not None:
            ident = ident.to(x.device)

        h = self.stem(x)
        skips: List[torch.Tensor] = []
        for i, (down, stage) in enumerate(zip(self.downsample, self.encoder)):
            if i > 0:
                skips.append(h)
            h = stage(down(h), ident)
        # skips = [skip0, skip1, skip2]; decoder goes deepest first
        for i, (up, fuse, dec) in enumerate(zip(self.upsample, self.fusion, self.decoder)):
            h = up(h)
            h = fuse(h, skips[2 - i])
            h = dec(h, ident)
        return self.head(h)
