# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""GLIMS: attention-guided lightweight multi-scale hybrid network (Yazici et al., arXiv 2404.17854)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medseg_nets.blocks.cpu import PointwiseConv3d
from medseg_nets.blocks.glims import (
    CSAB,
    DMSFBlock,
    DMSUBlock,
    PatchMerging3D,
    SwinStage3D,
    SwinUpStage3D,
    channel_layer_norm,
    conv_in_prelu,
)

__all__ = ["GLIMS", "AUTHORS_RELEASE"]

#: the constructor arguments that make :class:`GLIMS` compute what the authors' release (``yaziciz/GLIMS``,
#: ``GLIMS.py``) computes, where our defaults follow the paper instead; used by :meth:`GLIMS.authors_release`
AUTHORS_RELEASE = {"csab_spatial_norm": "layer", "relative_position": "cropped", "swin_up_norm": False}


class GLIMS(nn.Module):
    """GLIMS (Yazici, Oksuz, Ekenel, "GLIMS: Attention-Guided Lightweight Multi-Scale Hybrid Network for Volumetric
    Semantic Segmentation", arXiv 2404.17854), 3D.

    Written from the paper and from the layout of the authors' public release (``yaziciz/GLIMS``), which fixes
    what the paper leaves open; no code is taken from it. With ``F = feature_size``, an input of size ``S`` (each
    axis a multiple of 32) and ``LN`` a parameter-free layer norm over channels (MONAI SwinViT's ``proj_out``)::

        stem        Conv1x1-IN-PReLU  in -> F                                   S
        enc1..enc3  DMSF F -> 2F -> 4F -> 8F  (skips s1, s2, s3 at S, S/2, S/4)  -> 8F at S/8
        swin_enc1   LN(Swin(8F, depths[1] blocks, num_heads[1] heads) + PE)     S/8
        enc4        DMSF 8F -> 16F  (skip s4 = 8F at S/8)                        -> 16F at S/16
        swin_enc2   t = Swin(16F, depths[2], num_heads[2]) + PE;  s5 = LN(t)     S/16
        merge       LN(PatchMerging(t))  16F -> 32F                             S/32
        swin_bottleneck  LN(Swin(32F, depths[3], num_heads[3]) + PE)            S/32
        swin_up     Swin(Conv1x1-IN-PReLU([PE(PatchExpand(.)), CSAB(s5)]))      32F -> 16F at S/16
        dec4        DMSU 16F -> 8F with CSAB(s4)           -> d4                S/8
        swin_dec    LN(Swin(8F, depths[1], num_heads[1]) + PE)                  S/8
        dec3        DMSU 8F -> 4F with CSAB(s3)            -> d3                S/4
        dec2        DMSU 4F -> 2F with CSAB(s2)            -> d2                S/2
        dec1        DMSU 2F -> F  with CSAB(s1)            -> d1                S
        out         Conv1x1 F -> out (d1);  ds_heads: Conv1x1 on d2 (2F), d3 (4F), d4 (8F)

    (:class:`~medseg_nets.blocks.glims.DMSFBlock`, :class:`~medseg_nets.blocks.glims.DMSUBlock` and
    :class:`~medseg_nets.blocks.glims.DACB`, :class:`~medseg_nets.blocks.glims.CSAB`,
    :class:`~medseg_nets.blocks.glims.SwinStage3D`, :class:`~medseg_nets.blocks.glims.SwinUpStage3D`,
    :class:`~medseg_nets.blocks.glims.PatchMerging3D`; PE = learnable position embedding.) With the Swin-T
    settings ``depths=(2, 2, 6, 2)``, ``num_heads=(3, 6, 12, 24)`` the stages have 2 blocks / 6 heads at 8F,
    6 blocks / 12 heads at 16F (encoder and decoder side) and 2 blocks / 24 heads at 32F; the first Swin-T stage
    (``depths[0]``, ``num_heads[0]``) is not built, as in the reference. Window 7 (clamped to smaller maps),
    MLP ratio 4, qkv bias.

    Output: in eval mode (or with ``deep_supervision=False``) the logits ``(B, out_channels, D, H, W)``. In training
    mode with deep supervision, as MONAI's ``DynUNet``, one tensor ``(B, 4, out_channels, D, H, W)`` stacking on
    dim 1 the main output and the heads on ``d2``, ``d3``, ``d4``, each upsampled (trilinear) to the input size
    (the reference returns them at their own resolution); ``list(torch.unbind(y, dim=1))`` feeds
    ``monai.losses.DeepSupervisionLoss`` (main output first). A single tensor type in both modes keeps the network
    scriptable with TorchScript.

    Choices (those of the reference release unless marked):

    - every convolution has a bias and is followed by InstanceNorm (no affine) + PReLU (one parameter), except the
      DACB depth-wise branches (GroupNorm with one group per channel, affine), the CSAB spatial convolution (no
      bias) and the output heads (plain 1x1x1 convolutions); DACB embedding width ``2C`` everywhere (in DMSU the
      DACBs work at ``C_out`` with embedding ``C_in = 2 C_out``);
    - CSAB: channel MLP with reduction 2, 7x7x7 spatial convolution on ``[max, mean]``;
      ``csab_spatial_norm="instance"`` (ours) makes the spatial gate a real spatial map, where the reference's
      channel LayerNorm over a single channel makes it a constant (``"layer"`` reproduces that), same parameters;
    - Swin MLP activation PReLU (``swin_mlp_act``; ``"gelu"`` is Swin's), MONAI's ``PatchMerging`` voxel order
      (``downsample="merging"``), patch expanding ``Linear(2C, 8C/2)`` without bias + ``LN``;
    - position embeddings sized for ``img_size`` (96: grids 12^3, 6^3, 3^3, 6^3, 12^3), resampled trilinearly for
      other input sizes (ours: the reference only runs at its training size);
    - relative position bias: a clamped window (6^3, 3^3 at 96^3 input) looks up its true relative offsets in the
      13^3 table (Swin's definition, which the paper adopts); the reference crops the 7^3 index to ``[:n, :n]``
      (code inherited from MONAI's SwinUNETR), which gives most token pairs another pair's offsets;
      ``relative_position="cropped"`` reproduces that;
    - the output of the transformer up-sampling stage is not layer-normed (``swin_up_norm=False``), as in the
      reference, whose other Swin stages end with a parameter-free channel LayerNorm but whose up-sampling stage
      calls its ``proj_out`` with ``normalize=False``;
    - each DACB also holds the reference's unused PReLU, frozen (see :class:`~medseg_nets.blocks.glims.DACB`);
    - non-cubic inputs are handled directly (the reference adds a "learnable resizer" for them; not built);
    - deep-supervision heads upsampled to the input size (ours, see Output).

    Measured (``with torch.device("meta")``, ``sum(p.numel() for p in net.parameters())``): 47,163,349
    parameters for ``GLIMS(4, 3)`` and 47,167,281 for ``GLIMS(1, 14)`` at ``img_size=96``, exactly the reference
    (47,163,333 / 47,167,265 trainable: 16 frozen spare PReLUs); 113.968 GFLOPs at 1x4x96^3
    (``torch.utils.flop_counter.FlopCounterMode`` on the meta device, eval mode), the reference's 113.97 G. (The
    paper's 72.30 G comes from another counter; ``FlopCounterMode`` counts 2 FLOPs per multiply-add of
    convolutions, linear layers and attention products, nothing for norms and activations.)

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels (logits).
        feature_size: width F of the first stage.
        depths: Swin-T style blocks per stage; entries 1, 2, 3 are used at 8F, 16F, 32F.
        num_heads: Swin-T style heads per stage; entries 1, 2, 3 are used (each must divide its width).
        window_size: nominal Swin window (per axis).
        mlp_ratio: hidden width of the Swin MLPs relative to the token width.
        qkv_bias: learnable bias of the Swin query/key/value projections.
        img_size: patch size the position embeddings are laid out for (each axis a multiple of 32).
        swin_mlp_act: activation of the Swin MLPs, ``"prelu"`` (reference) or ``"gelu"``.
        downsample: patch merging voxel order, ``"merging"`` (reference, MONAI default) or ``"mergingv2"``.
        csab_reduction: reduction ratio of the CSAB channel MLP.
        csab_spatial_kernel_size: kernel size of the CSAB spatial-attention convolution.
        csab_spatial_norm: ``"instance"`` or ``"layer"`` (reference), see :class:`~medseg_nets.blocks.glims.CSAB`.
        relative_position: ``"offsets"`` or ``"cropped"`` (reference), see
            :class:`~medseg_nets.blocks.glims.SwinStage3D`.
        swin_up_norm: layer-norm the output of the transformer up-sampling stage (the reference does not).
        deep_supervision: return the deep-supervision heads in training mode.
        gradient_checkpointing: in training with gradients, recompute the DMSF encoders, the CSAB skip attentions
            and the DMSU decoders during the backward pass instead of keeping their activations
            (``torch.utils.checkpoint``, non-reentrant): the same outputs and gradients, less memory, more time.
            Off in eval mode, under ``torch.no_grad`` and in TorchScript.

    The authors' network (to load their weights, see :mod:`medseg_nets.convert.glims`) is
    ``GLIMS.authors_release(in_channels, out_channels, feature_size)``, i.e. these arguments with
    :data:`AUTHORS_RELEASE` (``csab_spatial_norm="layer"``, ``relative_position="cropped"``,
    ``swin_up_norm=False``). Verified against the
    output of the authors' ``GLIMS.py`` (``tests/test_convert_glims.py``, stored reference at feature size 12).
    """

    @classmethod
    def authors_release(
        cls, in_channels: int = 4, out_channels: int = 3, feature_size: int = 24, **kwargs
    ) -> "GLIMS":
        """GLIMS as the authors' release builds it (:data:`AUTHORS_RELEASE` over the other arguments): the network
        that their checkpoints, converted by ``medseg_nets.convert.convert_authors_state_dict("glims", ...)``,
        reproduce. ``kwargs`` are the other constructor arguments (e.g. ``img_size``, ``deep_supervision``);
        arguments in :data:`AUTHORS_RELEASE` may not be overridden here."""
        clash = sorted(set(kwargs) & set(AUTHORS_RELEASE))
        if clash:
            raise ValueError(f"authors_release fixes {clash}; build GLIMS(...) directly to change them.")
        return cls(in_channels, out_channels, feature_size, **kwargs, **AUTHORS_RELEASE)

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        img_size: Sequence[int] | int = 96,
        swin_mlp_act: str = "prelu",
        downsample: str = "merging",
        csab_reduction: int = 2,
        csab_spatial_kernel_size: int = 7,
        csab_spatial_norm: str = "instance",
        relative_position: str = "offsets",
        swin_up_norm: bool = False,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need four (Swin-T style) entries, got {depths}, {num_heads}.")
        widths = [feature_size * 2**i for i in range(6)]
        for w, h in zip(widths[3:], num_heads[1:]):
            if w % h != 0:
                raise ValueError(
                    f"Swin widths 8F, 16F, 32F ({widths[3]}, {widths[4]}, {widths[5]}) must be divisible by "
                    f"num_heads[1:] {tuple(num_heads[1:])}; got {w} % {h} != 0."
                )
        if isinstance(window_size, int):
            window_size = (window_size,) * 3
        if isinstance(img_size, int):
            img_size = (img_size,) * 3
        img = [int(s) for s in img_size]
        if len(img) != 3 or any(s % 32 != 0 or s <= 0 for s in img):
            raise ValueError(f"img_size must be three positive multiples of 32, got {tuple(img_size)}.")
        grid8 = [s // 8 for s in img]
        grid16 = [s // 16 for s in img]
        grid32 = [s // 32 for s in img]
        swin = dict(
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            mlp_act=swin_mlp_act,
            relative_position=relative_position,
        )
        self.deep_supervision = deep_supervision
        self.swin_up_norm = swin_up_norm
        self.stem = conv_in_prelu(in_channels, widths[0])
        self.encoders = nn.ModuleList([DMSFBlock(widths[i], widths[i + 1]) for i in range(4)])
        self.swin_enc1 = SwinStage3D(widths[3], depths[1], num_heads[1], grid=grid8, **swin)
        self.swin_enc2 = SwinStage3D(widths[4], depths[2], num_heads[2], grid=grid16, **swin)
        self.merge = PatchMerging3D(widths[4], downsample)
        self.merge.apply(_init_ln_linear)
        self.swin_bottleneck = SwinStage3D(widths[5], depths[3], num_heads[3], grid=grid32, **swin)
        self.swin_up = SwinUpStage3D(widths[4], depths[2], num_heads[2], grid=grid16, **swin)
        self.swin_dec = SwinStage3D(widths[3], depths[1], num_heads[1], grid=grid8, **swin)
        self.skip_attention = nn.ModuleList(
            [CSAB(widths[i], csab_reduction, csab_spatial_kernel_size, csab_spatial_norm) for i in range(5)]
        )
        # decoders[0]: 16F -> 8F (d4), decoders[1]: 8F -> 4F (d3), decoders[2]: 4F -> 2F (d2), decoders[3]: -> F
        self.decoders = nn.ModuleList([DMSUBlock(widths[i + 1], widths[i]) for i in range(3, -1, -1)])
        self.out = PointwiseConv3d(widths[0], out_channels)
        # deep-supervision heads on d2 (2F), d3 (4F), d4 (8F)
        self.ds_heads = nn.ModuleList([PointwiseConv3d(widths[i], out_channels) for i in (1, 2, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError("GLIMS expects a 5D input (B, C, D, H, W), got {} dims.".format(x.dim()))
        spatial = [int(s) for s in x.shape[2:]]
        for s in spatial:
            if s % 32 != 0:
                raise ValueError(
                    "GLIMS expects every spatial size to be a multiple of 32 (five 2x down-samplings), "
                    "got {}.".format(spatial)
                )
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = self.stem(x)
        skips: List[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            if not torch.jit.is_scripting() and ckpt:  # TorchScript drops this branch
                skip, h = checkpoint(enc, h, use_reentrant=False)
            else:
                skip, h = enc(h)
            skips.append(skip)
            if i == 2:
                h = channel_layer_norm(self.swin_enc1(h))
        t = self.swin_enc2(h)
        skips.append(channel_layer_norm(t))
        h = channel_layer_norm(self.merge(t))
        h = channel_layer_norm(self.swin_bottleneck(h))
        refined: List[torch.Tensor] = []
        for i, att in enumerate(self.skip_attention):
            if not torch.jit.is_scripting() and ckpt:
                refined.append(checkpoint(att, skips[i], use_reentrant=False))
            else:
                refined.append(att(skips[i]))
        h = self.swin_up(h, refined[4])
        if self.swin_up_norm:
            h = channel_layer_norm(h)
        dec_outs: List[torch.Tensor] = []
        for i, dec in enumerate(self.decoders):
            if not torch.jit.is_scripting() and ckpt:
                h = checkpoint(dec, h, refined[3 - i], use_reentrant=False)
            else:
                h = dec(h, refined[3 - i])
            dec_outs.append(h)
            if i == 0:
                h = channel_layer_norm(self.swin_dec(h))
        out = self.out(h)
        if self.training and self.deep_supervision:
            outs: List[torch.Tensor] = [out]
            for j, head in enumerate(self.ds_heads):
                # dec_outs[2] is d2 (2F), dec_outs[1] is d3 (4F), dec_outs[0] is d4 (8F)
                y = head(dec_outs[2 - j])
                outs.append(F.interpolate(y, size=spatial, mode="trilinear", align_corners=False))
            return torch.stack(outs, dim=1)
        return out


def _init_ln_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
