"""PVT-EMCAD: a PVTv2 encoder with the EMCAD decoder.

Rahman & Marculescu, "EMCAD: Efficient Multi-scale Convolutional Attention Decoding for Medical Image Segmentation",
CVPR 2024 (arXiv 2405.06880). Encoder: Wang et al., "PVT v2", CVMJ 2022.

Data flow (``C4 > C3 > C2 > C1`` are the encoder widths, deepest first)::

    x -> [input adapter] -> PVTv2 -> f1 (1/4), f2 (1/8), f3 (1/16), f4 (1/32)
    d4 = MSCAM4(f4)                                   -> head4
    u3 = EUCB3(d4); d3 = MSCAM3(u3 + LGAG3(u3, f3))   -> head3
    u2 = EUCB2(d3); d2 = MSCAM2(u2 + LGAG2(u2, f2))   -> head2
    u1 = EUCB1(d2); d1 = MSCAM1(u1 + LGAG1(u1, f1))   -> head1
    each head: 1x1 conv to the classes, bilinearly upsampled to the input size.

Train with :class:`medseg_nets.losses.mutation.MutationLoss` on the list of the four head outputs; inference uses the
shallowest head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_nets.blocks.emcad import EUCB, LGAG, MSCAM, SAB
from medseg_nets.nets.pvtv2 import (
    PVT_V2_CONFIGS,
    PretrainedLoadResult,
    PyramidVisionTransformerV2,
    load_pvtv2_pretrained,
)
from medseg_nets.nets.slicewise import cat_chunks, slices_to_volume, volume_to_slices

__all__ = ["EMCADDecoder", "EMCADNet", "EMCAD"]


class EMCADDecoder(nn.Module):
    """The EMCAD decoder (Rahman & Marculescu, CVPR 2024), without the segmentation heads.

    Args:
        channels: encoder widths from the deepest to the shallowest stage, e.g. ``(512, 320, 128, 64)`` for PVTv2-B2.
        kernel_sizes: depth-wise kernels of the MSCBs.
        expansion_factor: MSCB expansion.
        dw_parallel: run the MSCB depth-wise branches in parallel (True) or in sequence.
        add: sum (True) or concatenate the MSCB branches.
        lgag_ks: kernel size of the LGAG group convolutions.
        activation: activation of the MSCBs (ReLU6 in the reference); EUCB and LGAG use ReLU.
        cab_ratio: CAB reduction ratio.
        sab_kernel_size: SAB kernel.

    One :class:`SAB` is shared by the four MSCAMs (as in the reference: 98 parameters in all).
    The forward pass takes the encoder features shallowest first (``[f1, f2, f3, f4]``, as the encoder returns them)
    and returns the decoder maps deepest first (``[d4, d3, d2, d1]``).
    """

    def __init__(
        self,
        channels: Sequence[int] = (512, 320, 128, 64),
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: float = 2,
        dw_parallel: bool = True,
        add: bool = True,
        lgag_ks: int = 3,
        activation: str = "relu6",
        cab_ratio: int = 16,
        sab_kernel_size: int = 7,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must have 4 entries (deepest first), got {tuple(channels)}.")
        c4, c3, c2, c1 = (int(c) for c in channels)
        self.sab = SAB(sab_kernel_size)

        def mscam(c: int) -> MSCAM:
            return MSCAM(
                c,
                kernel_sizes=kernel_sizes,
                expansion_factor=expansion_factor,
                dw_parallel=dw_parallel,
                add=add,
                activation=activation,
                ratio=cab_ratio,
                spatial_attention=self.sab,
            )

        self.mscam4 = mscam(c4)
        self.eucb3 = EUCB(c4, c3, kernel_size=3, activation="relu")
        self.lgag3 = LGAG(c3, c3, inter_channels=c3 // 2, kernel_size=lgag_ks, groups=c3 // 2)
        self.mscam3 = mscam(c3)
        self.eucb2 = EUCB(c3, c2, kernel_size=3, activation="relu")
        self.lgag2 = LGAG(c2, c2, inter_channels=c2 // 2, kernel_size=lgag_ks, groups=c2 // 2)
        self.mscam2 = mscam(c2)
        self.eucb1 = EUCB(c2, c1, kernel_size=3, activation="relu")
        self.lgag1 = LGAG(c1, c1, inter_channels=c1 // 2, kernel_size=lgag_ks, groups=c1 // 2)
        self.mscam1 = mscam(c1)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        f1, f2, f3, f4 = features[0], features[1], features[2], features[3]
        d4 = self.mscam4(f4)

        u3 = self.eucb3(d4, [f3.shape[2], f3.shape[3]])
        d3 = self.mscam3(u3 + self.lgag3(u3, f3))

        u2 = self.eucb2(d3, [f2.shape[2], f2.shape[3]])
        d2 = self.mscam2(u2 + self.lgag2(u2, f2))

        u1 = self.eucb1(d2, [f1.shape[2], f1.shape[3]])
        d1 = self.mscam1(u1 + self.lgag1(u1, f1))
        return [d4, d3, d2, d1]


def _resolve_encoder(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = key if key.startswith("pvt_v2_") else f"pvt_v2_{key}"
    if key not in PVT_V2_CONFIGS:
        raise ValueError(f"Unknown encoder {name!r}; expected one of {sorted(PVT_V2_CONFIGS)}.")
    return key


class EMCADNet(nn.Module):
    """PVT-EMCAD segmentation network (Rahman & Marculescu, CVPR 2024, arXiv 2405.06880).

    Args:
        in_channels: input channels.
        out_channels: number of output channels (classes) of every head.
        encoder: PVTv2 variant, "pvt_v2_b0" ... "pvt_v2_b5" (or "b0" ... "b5"); the paper's PVT-EMCAD-B0 / -B2 use
            "pvt_v2_b0" / "pvt_v2_b2".
        kernel_sizes: MSCB depth-wise kernels.
        expansion_factor: MSCB expansion factor.
        dw_parallel: MSCB depth-wise branches in parallel.
        add: sum (True) or concatenate the MSCB branches.
        lgag_ks: LGAG group-convolution kernel size.
        activation: MSCB activation ("relu6").
        input_adapter: how inputs with ``in_channels != 3`` reach the RGB encoder:

            - ``"conv"`` (default, the reference's design for 1-channel inputs, applied here to any
              ``in_channels != 3``): a 1x1 conv (with bias) + BN + ReLU maps the input to 3 channels, and the encoder
              keeps its 3-channel ``patch_embed1``, so ImageNet weights load unchanged. With ``in_channels == 3``
              there is no adapter (and no adapter parameters).
            - ``"patch_embed"``: no adapter; ``patch_embed1`` takes ``in_channels`` directly and
              :func:`~medseg_nets.nets.pvtv2.load_pvtv2_pretrained` adapts its ImageNet weight (sum over RGB for one
              channel, tiled and rescaled by ``3 / C`` otherwise). This keeps all input information (the ``"conv"``
              adapter squeezes it through 3 rectified channels), at the price of a less "ImageNet-like" first layer.
        encoder_pretrained: optional path of a local official PVTv2 checkpoint loaded into the encoder.
        pretrained_strict: strictness of that loading.
        drop_path_rate: encoder stochastic depth (0.1 by default, the usual value of the PVTv2 dense-prediction
            backbones; identity in eval mode).
        drop_rate: encoder dropout.
        attn_drop_rate: encoder attention dropout.
        head_upsample_mode: interpolation of the head outputs to the input size ("bilinear").
        slice_axis: ``None`` (default): a 2D network, ``(B, in_channels, H, W)`` inputs only. 0, 1 or 2: the network
            also takes ``(B, in_channels, X, Y, Z)`` volumes and runs its 2D forward on every slice along that
            spatial axis (see below); 4D inputs keep the 2D behaviour.
        slice_batch: with ``slice_axis``, the most slices run through the 2D network at once in eval mode (bounds the
            memory of a whole volume; ``< 1``: all at once). In training mode every slice goes in one batch, so the
            BatchNorm statistics are those of the 2D network on the same slices.

    Forward: a ``(B, in_channels, H, W)`` tensor. For ``H, W`` multiples of 32 every upsampling is an exact 2x as in
    the reference; other sizes also work (each EUCB resizes to its skip's size, the encoder rounds sizes up). In
    training mode it returns the list of the four head outputs ``[p4, p3, p2, p1]`` (deepest first, all
    ``(B, out_channels, H, W)``); in eval mode only ``p1`` (the shallowest head, the last produced) as a tensor.
    :meth:`forward_heads` returns the four heads in either mode (the authors' ``forward(x, mode='test')``).

    With ``slice_axis`` set, a ``(B, in_channels, X, Y, Z)`` volume is cut into its slices along that axis (moved into
    the batch), each slice is zero-padded (centred) to multiples of 32, the network's total stride, run through the
    same 2D forward (``slice_batch`` slices at a time in eval mode), cropped back, and the slices are stacked into
    ``(B, out_channels, X, Y, Z)`` maps (:mod:`medseg_nets.nets.slicewise`). Each slice's output equals the 2D
    network's output on that padded slice, cropped. The option adds no parameter: ``state_dict`` keys are the same
    with and without it.

    The module scripts with ``torch.jit.script``. With the authors' weights converted by
    :mod:`medseg_nets.convert.emcad` (and their ``activation``), the four heads equal the authors' outputs
    (``tests/test_convert_dalight3d_emcad.py``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 9,
        encoder: str = "pvt_v2_b2",
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: float = 2,
        dw_parallel: bool = True,
        add: bool = True,
        lgag_ks: int = 3,
        activation: str = "relu6",
        input_adapter: str = "conv",
        encoder_pretrained: Optional[str] = None,
        pretrained_strict: bool = True,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        head_upsample_mode: str = "bilinear",
        slice_axis: Optional[int] = None,
        slice_batch: int = 32,
    ) -> None:
        super().__init__()
        if input_adapter not in ("conv", "patch_embed"):
            raise ValueError(f"input_adapter must be 'conv' or 'patch_embed', got {input_adapter!r}.")
        if slice_axis is not None and int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be None, 0, 1 or 2 (a spatial axis of a volume), got {slice_axis!r}.")
        self.slice_axis: Optional[int] = None if slice_axis is None else int(slice_axis)
        self.slice_batch = int(slice_batch)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.head_upsample_mode = head_upsample_mode
        self.align_corners = None if head_upsample_mode in ("nearest", "area") else False

        self.input_adapter = None
        encoder_in = in_channels
        if input_adapter == "conv" and in_channels != 3:
            self.input_adapter = nn.Sequential(
                nn.Conv2d(in_channels, 3, kernel_size=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)
            )
            encoder_in = 3
        self.encoder = PyramidVisionTransformerV2(
            in_channels=encoder_in,
            variant=_resolve_encoder(encoder),
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        channels = tuple(reversed(self.encoder.embed_dims))
        self.decoder = EMCADDecoder(
            channels,
            kernel_sizes=kernel_sizes,
            expansion_factor=expansion_factor,
            dw_parallel=dw_parallel,
            add=add,
            lgag_ks=lgag_ks,
            activation=activation,
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in channels)
        self.divisor = 32  # the PVTv2 encoder's total stride (4 x 2 x 2 x 2): slices are padded to its multiples
        self._init_decoder_weights()
        if encoder_pretrained:
            self.load_pretrained_encoder(encoder_pretrained, strict=pretrained_strict)

    def _init_decoder_weights(self) -> None:
        """He-normal (fan-out) convolutions, BN weight 1 / bias 0, in the adapter, decoder and heads."""
        modules = [self.decoder, self.heads] + ([self.input_adapter] if self.input_adapter is not None else [])
        for part in modules:
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def load_pretrained_encoder(self, path: str, strict: bool = True) -> PretrainedLoadResult:
        """Load an official PVTv2 ImageNet checkpoint (local file) into the encoder; see ``load_pvtv2_pretrained``."""
        return load_pvtv2_pretrained(self.encoder, path, strict=strict)

    def _heads(self, x: torch.Tensor, all_heads: bool) -> List[torch.Tensor]:
        size = [x.shape[2], x.shape[3]]
        adapter = self.input_adapter
        if adapter is not None:
            x = adapter(x)
        decoded = self.decoder(self.encoder(x))
        last = len(decoded) - 1
        logits: List[torch.Tensor] = []
        for i, head in enumerate(self.heads):
            # Without all_heads only the shallowest head (the inference output) is computed.
            if all_heads or i == last:
                logits.append(
                    F.interpolate(
                        head(decoded[i]), size=size, mode=self.head_upsample_mode, align_corners=self.align_corners
                    )
                )
        return logits

    def _run(self, x: torch.Tensor, all_heads: bool) -> List[torch.Tensor]:
        """The heads for a 2D batch, or (with ``slice_axis``) for a batch of volumes, slice by slice."""
        axis = self.slice_axis
        if x.dim() == 4:
            return self._heads(x, all_heads)
        if axis is None or x.dim() != 5:
            expected = "(B, C, H, W) slices" if axis is None else "(B, C, H, W) slices or (B, C, X, Y, Z) volumes"
            raise ValueError(f"EMCADNet (slice_axis={axis}) takes {expected}, got a tensor of shape {list(x.shape)}.")
        slices, pad = volume_to_slices(x, axis, self.divisor)
        if self.training or self.slice_batch < 1 or slices.shape[0] <= self.slice_batch:
            heads = self._heads(slices, all_heads)
        else:
            heads = cat_chunks([self._heads(chunk, all_heads) for chunk in torch.split(slices, self.slice_batch)])
        return [slices_to_volume(h, x.shape[0], axis, pad) for h in heads]

    @torch.jit.export
    def forward_heads(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four head outputs ``[p4, p3, p2, p1]`` (deepest first, each at the input size) in either mode, as
        the authors' ``forward(x, mode='test')`` returns them."""
        return self._run(x, True)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.training:
            return self._run(x, True)
        return self._run(x, False)[-1]


EMCAD = EMCADNet
