"""Pyramid Vision Transformer v2 (PVTv2) encoder.

Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", Computational Visual Media 8, 2022
(arXiv 2106.13797).

The encoder has four stages. Each stage is an overlapping patch embedding (a strided convolution with a kernel larger
than its stride, followed by LayerNorm; 7x7 stride 4 for the first stage, 3x3 stride 2 for the others), a stack of
transformer blocks with spatial-reduction attention (keys and values computed on a map shrunk by a strided
``sr_ratio x sr_ratio`` convolution) and a convolutional feed-forward network (a 3x3 depth-wise convolution between
the two linear layers), and a final LayerNorm. The forward pass returns the four feature maps at 1/4, 1/8, 1/16 and
1/32 of the input resolution, in ``(B, C, H, W)`` layout.

Parameter and module names follow the official release (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``,
``block1.0.mlp.dwconv.dwconv.weight``, ``norm1.weight``, ...), so an official ImageNet checkpoint saved as a local
file can be loaded with :func:`load_pvtv2_pretrained`. The classification head of that checkpoint is not part of
this encoder and is dropped by the loader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from medseg_nets.blocks.glims import init_transformer_weights

logger = logging.getLogger(__name__)

__all__ = [
    "PVT_V2_CONFIGS",
    "DropPath",
    "OverlapPatchEmbed",
    "SpatialReductionAttention",
    "DWConv",
    "ConvMlp",
    "PVTv2Block",
    "PyramidVisionTransformerV2",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
    "PretrainedLoadResult",
    "adapt_input_conv_weight",
    "load_pvtv2_pretrained",
]

# Published variants (PVT v2 paper, Table 1). All share num_heads (1, 2, 5, 8) and sr_ratios (8, 4, 2, 1).
PVT_V2_CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "pvt_v2_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3), "mlp_ratios": (4, 4, 4, 4)},
}
_NUM_HEADS = (1, 2, 5, 8)
_SR_RATIOS = (8, 4, 2, 1)
# LayerNorm epsilon of the transformer blocks and of the per-stage output norms in the official release; the patch
# embeddings and the spatial-reduction norms use the PyTorch default (1e-5).
_BLOCK_LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training.

    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016. Surviving samples are rescaled by
    ``1 / (1 - drop_prob)`` so the expectation is unchanged; identity in eval mode or when ``drop_prob == 0``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding of PVTv2: ``Conv2d(k, stride, padding=k // 2)`` then LayerNorm over channels.

    Returns the token sequence ``(B, H' * W', C)`` and the token-grid size ``H', W'`` (``ceil(H / stride)``).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 7, stride: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, h, w


class SpatialReductionAttention(nn.Module):
    """Spatial-reduction attention (SRA) of PVT/PVTv2.

    Multi-head attention where the queries come from all ``N = H * W`` tokens and the keys/values from the token map
    reduced by a ``sr_ratio x sr_ratio`` convolution with stride ``sr_ratio`` followed by LayerNorm (no reduction
    when ``sr_ratio == 1``): ``softmax(Q K^T / sqrt(d)) V`` then a linear projection. The attention is written as
    explicit matrix products (as in the reference) so that FLOP counters see it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = float(qk_scale) if qk_scale is not None else head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        # `sr` and `norm` only exist when the map is reduced (official state_dict layout).
        self.sr = None
        self.norm = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
        sr = self.sr
        norm = self.norm
        if sr is not None and norm is not None:
            x_ = x.permute(0, 2, 1).reshape(b, c, h, w)
            x_ = sr(x_).reshape(b, c, -1).permute(0, 2, 1)
            x_ = norm(x_)
        else:
            x_ = x
        kv = self.kv(x_).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class DWConv(nn.Module):
    """3x3 depth-wise convolution applied to a token sequence ``(B, H * W, C)`` laid out on its ``H x W`` grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class ConvMlp(nn.Module):
    """PVTv2 convolutional feed-forward network: ``fc1 -> 3x3 depth-wise conv -> GELU -> fc2`` (with dropout)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x), h, w))
        x = self.drop(x)
        return self.drop(self.fc2(x))


class PVTv2Block(nn.Module):
    """PVTv2 transformer block: ``x + DropPath(SRA(LN(x)))`` then ``x + DropPath(ConvMlp(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_LN_EPS)
        self.attn = SpatialReductionAttention(
            dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_LN_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class PyramidVisionTransformerV2(nn.Module):
    """PVTv2 encoder (Wang et al., "PVT v2", CVMJ 2022) returning four feature maps at 1/4, 1/8, 1/16, 1/32.

    Args:
        in_channels: number of input channels (3 for the ImageNet weights; :func:`load_pvtv2_pretrained` adapts
            ``patch_embed1.proj.weight`` to other values).
        embed_dims: channel width of the four stages.
        num_heads: attention heads per stage.
        mlp_ratios: hidden width of the feed-forward network relative to the stage width.
        depths: number of transformer blocks per stage.
        sr_ratios: spatial-reduction ratio of the keys/values per stage.
        qkv_bias: bias in the query and key/value projections.
        qk_scale: attention scale; ``head_dim ** -0.5`` when None.
        drop_rate: dropout after the attention projection and in the feed-forward network.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic-depth rate, increased linearly from 0 over all blocks up to this value.
        variant: one of ``PVT_V2_CONFIGS`` ("pvt_v2_b0" ... "pvt_v2_b5", or just "b0" ... "b5"); when given it sets
            ``embed_dims``, ``depths``, ``mlp_ratios`` (and the standard ``num_heads``/``sr_ratios``), overriding
            those arguments.

    The forward pass returns ``[f1, f2, f3, f4]`` with shapes ``(B, embed_dims[i], ceil(H / 2**(i+2)), ...)``.
    Only four stages are supported (the official layout with ``patch_embed1..4``, ``block1..4``, ``norm1..4``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = _NUM_HEADS,
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = _SR_RATIOS,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        if variant is not None:
            name = variant if variant.startswith("pvt_v2_") else f"pvt_v2_{variant}"
            if name not in PVT_V2_CONFIGS:
                raise ValueError(f"Unknown PVTv2 variant {variant!r}; expected one of {sorted(PVT_V2_CONFIGS)}.")
            cfg = PVT_V2_CONFIGS[name]
            embed_dims, depths, mlp_ratios = cfg["embed_dims"], cfg["depths"], cfg["mlp_ratios"]
            num_heads, sr_ratios = _NUM_HEADS, _SR_RATIOS
        for arg_name, arg in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("mlp_ratios", mlp_ratios),
            ("depths", depths),
            ("sr_ratios", sr_ratios),
        ):
            if len(arg) != 4:
                raise ValueError(f"{arg_name} must have 4 entries (one per stage), got {tuple(arg)}.")
        self.in_channels = in_channels
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.depths = tuple(int(d) for d in depths)
        total_blocks = sum(self.depths)
        dpr = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]  # linear 0 -> rate

        cur = 0
        prev = in_channels
        for i in range(4):
            embed = OverlapPatchEmbed(
                prev, self.embed_dims[i], patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2
            )
            blocks = nn.ModuleList(
                PVTv2Block(
                    self.embed_dims[i],
                    num_heads[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cur + j],
                )
                for j in range(self.depths[i])
            )
            cur += self.depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(self.embed_dims[i], eps=_BLOCK_LN_EPS))
            prev = self.embed_dims[i]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official PVTv2 initialisation: truncated normal (std 0.02) linears, He-normal (fan-out) convs."""
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:  # linears and LayerNorms
            init_transformer_weights(m)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        # The four stages are written out so the module scripts with TorchScript and keeps the official names.
        x, h, w = self.patch_embed1(x)
        for blk in self.block1:
            x = blk(x, h, w)
        x = _tokens_to_map(self.norm1(x), h, w)
        outs.append(x)

        x, h, w = self.patch_embed2(x)
        for blk in self.block2:
            x = blk(x, h, w)
        x = _tokens_to_map(self.norm2(x), h, w)
        outs.append(x)

        x, h, w = self.patch_embed3(x)
        for blk in self.block3:
            x = blk(x, h, w)
        x = _tokens_to_map(self.norm3(x), h, w)
        outs.append(x)

        x, h, w = self.patch_embed4(x)
        for blk in self.block4:
            x = blk(x, h, w)
        x = _tokens_to_map(self.norm4(x), h, w)
        outs.append(x)
        return outs


def _factory(variant: str, **kwargs: Any) -> PyramidVisionTransformerV2:
    return PyramidVisionTransformerV2(variant=variant, **kwargs)


def pvt_v2_b0(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B0: dims 32/64/160/256, depths 2/2/2/2 (3.41M parameters without the classifier head)."""
    return _factory("pvt_v2_b0", **kwargs)


def pvt_v2_b1(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B1: dims 64/128/320/512, depths 2/2/2/2."""
    return _factory("pvt_v2_b1", **kwargs)


def pvt_v2_b2(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B2: dims 64/128/320/512, depths 3/4/6/3 (24.85M parameters without the classifier head)."""
    return _factory("pvt_v2_b2", **kwargs)


def pvt_v2_b3(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B3: dims 64/128/320/512, depths 3/4/18/3."""
    return _factory("pvt_v2_b3", **kwargs)


def pvt_v2_b4(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B4: dims 64/128/320/512, depths 3/8/27/3."""
    return _factory("pvt_v2_b4", **kwargs)


def pvt_v2_b5(**kwargs: Any) -> PyramidVisionTransformerV2:
    """PVTv2-B5: dims 64/128/320/512, depths 3/6/40/3, MLP ratio 4 in all stages."""
    return _factory("pvt_v2_b5", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Loading official ImageNet checkpoints from a local file
# ----------------------------------------------------------------------------------------------------------------
class PretrainedLoadResult(NamedTuple):
    """Keys reported by :func:`load_pvtv2_pretrained` (the classifier head is dropped and not reported)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]


def adapt_input_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB first-layer convolution weight ``(O, 3, kh, kw)`` to ``in_channels`` input channels.

    - ``in_channels == 1``: sum over the RGB axis, so a grey image replicated to RGB and the single-channel input give
      the same response.
    - otherwise: tile the RGB filters along the input axis (R, G, B, R, G, ...) up to ``in_channels`` and rescale by
      ``3 / in_channels``, which keeps the expected activation magnitude when the channels have similar statistics
      (the usual approach, e.g. in timm's ``adapt_input_conv``).
    - ``in_channels == weight.shape[1]``: returned unchanged.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}.")
    dtype = weight.dtype
    w = weight.float()
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = int(math.ceil(in_channels / src))
        w = w.repeat(1, reps, 1, 1)[:, :in_channels] * (src / float(in_channels))
    return w.to(dtype)


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"Checkpoint does not contain a state_dict (got {type(obj).__name__}).")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # Strip a DataParallel/DistributedDataParallel prefix when every key carries it.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_pvtv2_pretrained(
    model: PyramidVisionTransformerV2, path: str, strict: bool = True
) -> PretrainedLoadResult:
    """Load an official PVTv2 checkpoint from a local file into ``model``.

    Args:
        model: the encoder (for an :class:`~medseg_nets.nets.emcad.EMCADNet` pass ``net.encoder``).
        path: local file written by ``torch.save``: a plain state_dict, or a dict with the state_dict under
            ``"model"`` or ``"state_dict"``. A ``module.`` prefix common to all keys is stripped.
        strict: raise a ``RuntimeError`` listing the missing, unexpected and shape-mismatched keys if there are any;
            otherwise load what matches and return them.

    The classification head (``head.*``) is dropped. ``patch_embed1.proj.weight`` is adapted with
    :func:`adapt_input_conv_weight` when the model's ``in_channels`` differs from the checkpoint's (3 for ImageNet).

    Returns:
        ``PretrainedLoadResult(missing_keys, unexpected_keys, mismatched_keys)``.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in _extract_state_dict(ckpt).items() if not k.startswith("head.")}

    own = model.state_dict()
    key = "patch_embed1.proj.weight"
    if key in sd and key in own and sd[key].dim() == 4 and sd[key].shape[1] != own[key].shape[1]:
        if sd[key].shape[0] == own[key].shape[0] and sd[key].shape[2:] == own[key].shape[2:]:
            sd[key] = adapt_input_conv_weight(sd[key], own[key].shape[1])

    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    )
    if strict and (missing or unexpected or mismatched):
        lines = [f"Error loading PVTv2 weights from {path!r} (strict=True):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        lines.append("  Use strict=False to load the matching tensors only.")
        raise RuntimeError("\n".join(lines))
    loadable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    if missing or unexpected or mismatched:  # strict=False: say what was left out instead of staying silent
        logger.warning(
            "PVTv2 weights from %r loaded with strict=False: %d of %d model tensors loaded; missing %d%s; "
            "unexpected %d%s; shape mismatches %d%s",
            path, len(loadable), len(own), len(missing), f" ({', '.join(missing[:8])}...)" if missing else "",
            len(unexpected), f" ({', '.join(unexpected[:8])}...)" if unexpected else "",
            len(mismatched), f" ({'; '.join(mismatched[:4])}...)" if mismatched else "",
        )
    return PretrainedLoadResult(missing, unexpected, mismatched)
