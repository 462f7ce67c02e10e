"""EAM-Net: attention-guided multi-scale network for skin-lesion segmentation (2D).

Wang et al., "Effective Attention-Guided Multi-Scale Medical Network for Skin Lesion Segmentation", BIBM 2025,
arXiv 2512.07275. Built from the paper's summary (no reference code or full text is available); the choices the
summary leaves open are documented on each block in :mod:`medseg_nets.blocks.eamnet` and in the model card.

Data flow with the default widths (``C = 24, 48, 96, 192, 384``, input ``H x W`` divisible by 16)::

    e1 = MRCF(Res(x))              24 @ H            -> MSEF side
    e2 = MRCF(Res(pool(e1)))       48 @ H/2          -> MSEF side
    e3 = MRCF(Res(pool(e2)))       96 @ H/4          -> MSEF side
    e4 = MRCF(Res(pool(e3)))      192 @ H/8          -> MSEF side
    b  = MRCF(Res(pool(e4)))      384 @ H/16         -> MSEF side   (bottleneck)
    d4 = CMAM(Res(fuse(up(b),  EAB(e4))))   192      -> MSDF side
    d3 = CMAM(Res(fuse(up(d4), EAB(e3))))    96      -> MSDF side
    d2 = CMAM(Res(fuse(up(d3), EAB(e2))))    48      -> MSDF side
    d1 = CMAM(Res(fuse(up(d2), EAB(e1))))    24      -> MSDF side
    main = MSDF fusion of the four decoder sides; MSEF fusion of the five encoder sides (training only)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn as nn

from medseg_nets.blocks.eamnet import MRCF, EAMDecoderBlock, MultiScaleFusionHead, ResidualBlock

__all__ = ["EAMNet"]


class EAMNet(nn.Module):
    """EAM-Net (Wang et al., BIBM 2025, arXiv 2512.07275).

    U-shaped network. Encoder: ``len(features)`` levels, each a :class:`ResidualBlock` followed by
    :class:`MRCF` (multi-rate dilated GhostNet-style cheap convs), with a 2x2 max-pool before every level but the
    first; the deepest level is the bottleneck, every other level feeds a skip. Each skip goes through an
    External Attention Bridge (EANet external memory + top-k channel selection) and is fused in a decoder stage
    refined by CMAM (cross-mixed spatial/channel attention), see :class:`EAMDecoderBlock`. Multi-scale
    supervision: MSDF fuses 1x1 side outputs of all decoder stages into the main prediction; MSEF does the same on
    the encoder levels and exists for training only.

    With the defaults, ``features=(24, 48, 96, 192, 384)``: four skip stages plus a bottleneck, so the input
    height and width must be divisible by ``2 ** (len(features) - 1) = 16``.

    Args:
        in_channels: input channels (3 for RGB dermoscopy).
        out_channels: output channels; 1 for a binary lesion mask (logits, apply a sigmoid in the loss /
            post-processing).
        features: width of each encoder level, shallowest first; the last is the bottleneck. Each must be
            divisible by ``len(dilations) + 1`` (MRCF groups).
        dilations: MRCF dilation rates (EAM-Net: 3, 5, 7).
        memory_size: EAB external memory slots ``S`` (EANet's default 64).
        topk_ratio: EAB fraction of channels of the memory read-out kept (``k = round(ratio * C)``).
        straight_through: EAB straight-through gradient of the top-k mask in training.
        pool_size: CMAM pooled key/value grid side of the spatial-attention direction.
        deep_supervision: in training mode, return the main output plus the MSDF/MSEF side outputs.

    Forward:
        eval mode, or ``deep_supervision=False``: the main logits, ``(B, out_channels, H, W)``.
        training mode with ``deep_supervision=True``: a list of ``2 * len(features) + 1`` logit maps, all
        ``(B, out_channels, H, W)``: ``[main (MSDF fused), MSEF fused, MSDF sides shallow->deep (len - 1),
        MSEF sides shallow->deep (len)]``, ready for ``monai.losses.DeepSupervisionLoss`` (which takes the same
        list in training and a single tensor in validation).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = (24, 48, 96, 192, 384),
        dilations: Sequence[int] = (3, 5, 7),
        memory_size: int = 64,
        topk_ratio: float = 0.5,
        straight_through: bool = True,
        pool_size: int = 8,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels (one skip and a bottleneck), got {features}.")
        self.size_divisor = 2 ** (len(features) - 1)
        self.deep_supervision = deep_supervision

        encoder: list[nn.Module] = []
        prev = in_channels
        for i, f in enumerate(features):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 0 else []
            layers += [ResidualBlock(prev, f), MRCF(f, dilations)]
            encoder.append(nn.Sequential(*layers))
            prev = f
        self.encoder = nn.ModuleList(encoder)

        # deepest first: decoder[j] fuses skip level len(features) - 2 - j
        self.decoder = nn.ModuleList(
            [
                EAMDecoderBlock(features[i + 1], features[i], memory_size, topk_ratio, straight_through, pool_size)
                for i in reversed(range(len(features) - 1))
            ]
        )
        self.msdf = MultiScaleFusionHead(features[:-1], out_channels)
        self.msef = MultiScaleFusionHead(features, out_channels)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        h, w = x.shape[2], x.shape[3]
        if h % self.size_divisor != 0 or w % self.size_divisor != 0:
            raise ValueError(
                "EAMNet needs the input height and width divisible by "
                + str(self.size_divisor)
                + ", got "
                + str(h)
                + "x"
                + str(w)
                + "."
            )
        size = [h, w]

        enc: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            enc.append(x)

        dec: list[torch.Tensor] = []
        n_skips = len(enc) - 1
        for j, block in enumerate(self.decoder):
            x = block(x, enc[n_skips - 1 - j])
            dec.insert(0, x)  # keep shallowest first

        main, dec_sides = self.msdf(dec, size)
        if not (self.training and self.deep_supervision):
            return main
        enc_fused, enc_sides = self.msef(enc, size)
        return [main, enc_fused] + dec_sides + enc_sides
