"""Key mapping from the authors' GLIMS release (``yaziciz/GLIMS``, ``GLIMS.py``) to :class:`medseg_nets.nets.GLIMS`.

The authors' module names (left) and ours (right), ``i`` = 1..4 for the encoder/decoder stages, ``k`` = 1..5 for
the skip attentions:

=====================================================  =========================================================
``stem.conv`` / ``stem.adn.A``                          ``stem.0`` / ``stem.2``
``dmsf_i.l1``, ``dmsf_i.l2`` (DACB)                     ``encoders.{i-1}.dacb1``, ``.dacb2``
``dmsf_i.ds.conv_3x3.conv`` / ``.adn.A``                ``encoders.{i-1}.down.0`` / ``.down.2``
``dmsu_i.up.convT.conv`` / ``.adn.A``                   ``decoders.{4-i}.up.0`` / ``.up.2``
``dmsu_i.conv1x1.conv`` / ``.adn.A``                    ``decoders.{4-i}.fuse.0`` / ``.fuse.2``
``dmsu_i.l1``, ``dmsu_i.l2`` (DACB)                     ``decoders.{4-i}.dacb1``, ``.dacb2``
DACB ``conv_3x3``, ``conv_3x3_dil``, ``conv_3x3_dil2``  ``branches.0``, ``.1``, ``.2`` (``conv``/``norm``/``prelu``
                                                        -> ``0``/``1``/``2``)
DACB ``conv_1x1``, ``conv_1x1_2``                       ``embed``, ``project`` (``conv`` -> ``0``, ``adn.A`` -> ``2``)
DACB ``prelu2`` / ``prelu`` (unused there)              ``act`` / ``spare_act``
``t3.layer``, ``t4_pre.layer``, ``t4.layer``            ``swin_enc1``, ``swin_enc2``, ``swin_bottleneck``
``t3_up.layer``                                         ``swin_dec``
``t4_post.layer`` (``blocks``)                          ``swin_up`` (``stage.blocks``)
``*.layer.position_embeddings``                         ``*.pos.position_embeddings``
``t4_pre.layer.downsample``                             ``merge``
``t4_post.layer.upsample.expand`` / ``.norm_layer``     ``swin_up.upsample.expand`` / ``.norm``
``t4_post.layer.conv1x1.conv`` / ``.adn.A``             ``swin_up.fuse.0`` / ``.fuse.2``
``csab_k.ChannelGate.mlp.1`` / ``.mlp.3``               ``skip_attention.{k-1}.mlp.0`` / ``.mlp.2``
``csab_k.SpatialGate.spatial.conv`` / ``.norm`` /       ``skip_attention.{k-1}.spatial`` / ``.spatial_norm`` /
``.prelu``                                              ``.spatial_act``
``out1.conv.conv``; ``out2``, ``out3``, ``out4``        ``out``; ``ds_heads.0``, ``.1``, ``.2``
=====================================================  =========================================================

Swin blocks keep their names (``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``,
``norm2``, ``mlp.linear1``, ``mlp.fn``, ``mlp.linear2``). The authors' ``attn.relative_position_index`` buffers
are derived from the window size (our network computes the index in its forward) and are dropped.

The converted weights reproduce the authors' network when loaded into ``GLIMS.authors_release(...)`` (see
:meth:`medseg_nets.nets.GLIMS.authors_release`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from medseg_nets.convert import AuthorsCheckpointError

__all__ = ["convert", "map_key", "authors_keys", "DROPPED"]

_DACB_BRANCH = {"conv_3x3": "0", "conv_3x3_dil": "1", "conv_3x3_dil2": "2"}
_DACB_POINTWISE = {"conv_1x1": "embed", "conv_1x1_2": "project"}
_CONV_ADN = {"conv.weight": "0.weight", "conv.bias": "0.bias", "adn.A.weight": "2.weight"}
_GROUPCONV = {
    "conv.weight": "0.weight",
    "conv.bias": "0.bias",
    "norm.weight": "1.weight",
    "norm.bias": "1.bias",
    "prelu.weight": "2.weight",
}
_SWIN_STAGES = {"t3": "swin_enc1", "t4_pre": "swin_enc2", "t4": "swin_bottleneck", "t3_up": "swin_dec"}
_SWIN_BLOCK_PARAMS = (
    "norm1.weight",
    "norm1.bias",
    "attn.relative_position_bias_table",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.linear1.weight",
    "mlp.linear1.bias",
    "mlp.fn.weight",
    "mlp.linear2.weight",
    "mlp.linear2.bias",
)
_CSAB = {
    "ChannelGate.mlp.1.weight": "mlp.0.weight",
    "ChannelGate.mlp.1.bias": "mlp.0.bias",
    "ChannelGate.mlp.3.weight": "mlp.2.weight",
    "ChannelGate.mlp.3.bias": "mlp.2.bias",
    "SpatialGate.spatial.conv.weight": "spatial.weight",
    "SpatialGate.spatial.norm.weight": "spatial_norm.weight",
    "SpatialGate.spatial.norm.bias": "spatial_norm.bias",
    "SpatialGate.spatial.prelu.weight": "spatial_act.weight",
}
_OUT_HEADS = {"out1": "out", "out2": "ds_heads.0", "out3": "ds_heads.1", "out4": "ds_heads.2"}

#: marker returned by :func:`map_key` for a key that is known and deliberately dropped
DROPPED = ""


def _map_dacb(rest: str) -> str | None:
    m = re.fullmatch(r"(conv_3x3|conv_3x3_dil|conv_3x3_dil2)\.(.+)", rest)
    if m and m.group(2) in _GROUPCONV:
        return f"branches.{_DACB_BRANCH[m.group(1)]}.{_GROUPCONV[m.group(2)]}"
    m = re.fullmatch(r"(conv_1x1|conv_1x1_2)\.(.+)", rest)
    if m and m.group(2) in _CONV_ADN:
        return f"{_DACB_POINTWISE[m.group(1)]}.{_CONV_ADN[m.group(2)]}"
    return {"prelu2.weight": "act.weight", "prelu.weight": "spare_act.weight"}.get(rest)


def _map_swin_block(rest: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if m is None:
        return None
    if m.group(2) == "attn.relative_position_index":
        return DROPPED
    return f"blocks.{m.group(1)}.{m.group(2)}" if m.group(2) in _SWIN_BLOCK_PARAMS else None


def map_key(key: str) -> str | None:
    """Our name for the authors' state-dict ``key``; :data:`DROPPED` (``""``) for a derived buffer that is not
    loaded; ``None`` for a key that is not part of the authors' GLIMS."""
    if key.startswith("stem."):
        return "stem." + _CONV_ADN[key[5:]] if key[5:] in _CONV_ADN else None
    m = re.fullmatch(r"dmsf_([1-4])\.(l1|l2|ds)\.(.+)", key)
    if m:
        stage, part, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        if part == "ds":
            sub = rest[len("conv_3x3.") :] if rest.startswith("conv_3x3.") else None
            return f"encoders.{stage}.down.{_CONV_ADN[sub]}" if sub in _CONV_ADN else None
        mapped = _map_dacb(rest)
        return f"encoders.{stage}.dacb{part[1]}.{mapped}" if mapped else None
    m = re.fullmatch(r"dmsu_([1-4])\.(l1|l2|up\.convT|conv1x1)\.(.+)", key)
    if m:
        stage, part, rest = 4 - int(m.group(1)), m.group(2), m.group(3)
        if part in ("up.convT", "conv1x1"):
            name = "up" if part == "up.convT" else "fuse"
            return f"decoders.{stage}.{name}.{_CONV_ADN[rest]}" if rest in _CONV_ADN else None
        mapped = _map_dacb(rest)
        return f"decoders.{stage}.dacb{part[1]}.{mapped}" if mapped else None
    m = re.fullmatch(r"(t3|t4_pre|t4|t3_up)\.layer\.(.+)", key)
    if m:
        ours, rest = _SWIN_STAGES[m.group(1)], m.group(2)
        if rest == "position_embeddings":
            return f"{ours}.pos.position_embeddings"
        if m.group(1) == "t4_pre" and rest in ("downsample.norm.weight", "downsample.norm.bias"):
            return "merge." + rest[len("downsample.") :]
        if m.group(1) == "t4_pre" and rest == "downsample.reduction.weight":
            return "merge.reduction.weight"
        mapped = _map_swin_block(rest)
        return mapped if mapped in (None, DROPPED) else f"{ours}.{mapped}"
    if key.startswith("t4_post.layer."):
        rest = key[len("t4_post.layer.") :]
        fixed = {
            "position_embeddings": "swin_up.pos.position_embeddings",
            "upsample.expand.weight": "swin_up.upsample.expand.weight",
            "upsample.norm_layer.weight": "swin_up.upsample.norm.weight",
            "upsample.norm_layer.bias": "swin_up.upsample.norm.bias",
        }
        if rest in fixed:
            return fixed[rest]
        if rest.startswith("conv1x1."):
            sub = rest[len("conv1x1.") :]
            return f"swin_up.fuse.{_CONV_ADN[sub]}" if sub in _CONV_ADN else None
        mapped = _map_swin_block(rest)
        return mapped if mapped in (None, DROPPED) else f"swin_up.stage.{mapped}"
    m = re.fullmatch(r"csab([1-5])\.(.+)", key)
    if m:
        return f"skip_attention.{int(m.group(1)) - 1}.{_CSAB[m.group(2)]}" if m.group(2) in _CSAB else None
    m = re.fullmatch(r"(out[1-4])\.conv\.conv\.(weight|bias)", key)
    if m:
        return f"{_OUT_HEADS[m.group(1)]}.{m.group(2)}"
    return None


def authors_keys(depths: tuple[int, ...] = (2, 2, 6, 2)) -> list[str]:
    """The authors' parameter names for Swin ``depths`` (their ``relative_position_index`` buffers excluded): what a
    checkpoint of the release must hold; used to report what a checkpoint lacks."""
    keys = ["stem." + k for k in _CONV_ADN]
    dacb = [f"{b}.{p}" for b in _DACB_BRANCH for p in _GROUPCONV]
    dacb += [f"{c}.{p}" for c in _DACB_POINTWISE for p in _CONV_ADN] + ["prelu.weight", "prelu2.weight"]
    for i in range(1, 5):
        keys += [f"dmsf_{i}.{lv}.{p}" for lv in ("l1", "l2") for p in dacb]
        keys += [f"dmsf_{i}.ds.conv_3x3.{p}" for p in _CONV_ADN]
        keys += [f"dmsu_{i}.{lv}.{p}" for lv in ("l1", "l2") for p in dacb]
        keys += [f"dmsu_{i}.up.convT.{p}" for p in _CONV_ADN] + [f"dmsu_{i}.conv1x1.{p}" for p in _CONV_ADN]
    stage_depth = {"t3": depths[1], "t4_pre": depths[2], "t4": depths[3], "t3_up": depths[1], "t4_post": depths[2]}
    for stage, depth in stage_depth.items():
        keys.append(f"{stage}.layer.position_embeddings")
        keys += [f"{stage}.layer.blocks.{j}.{p}" for j in range(depth) for p in _SWIN_BLOCK_PARAMS]
    keys += [f"t4_pre.layer.downsample.{p}" for p in ("norm.weight", "norm.bias", "reduction.weight")]
    keys += [f"t4_post.layer.upsample.{p}" for p in ("expand.weight", "norm_layer.weight", "norm_layer.bias")]
    keys += [f"t4_post.layer.conv1x1.{p}" for p in _CONV_ADN]
    keys += [f"csab{k}.{p}" for k in range(1, 6) for p in _CSAB]
    keys += [f"{h}.conv.conv.{p}" for h in _OUT_HEADS for p in ("weight", "bias")]
    return keys


def convert(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the authors' (unwrapped, ``module.``-free) GLIMS state dict to ours.

    Raises:
        AuthorsCheckpointError: a key that is not part of the authors' GLIMS, or a parameter of the release
            (Swin depths inferred from the checkpoint's blocks) that the checkpoint lacks; the message names it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        ours = map_key(key)
        if ours is None:
            unknown.append(key)
        elif ours != DROPPED:
            out[ours] = value
    if unknown:
        raise AuthorsCheckpointError(
            f"{len(unknown)} key(s) of the checkpoint are not part of the authors' GLIMS (yaziciz/GLIMS), "
            f"e.g. {unknown[:5]}"
        )
    depths = _depths_of(state_dict)
    missing = sorted(k for k in authors_keys(depths) if k not in state_dict)
    if missing:
        raise AuthorsCheckpointError(
            f"the checkpoint lacks {len(missing)} parameter(s) of the authors' GLIMS, e.g. {missing[:5]}"
        )
    return out


def _depths_of(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Swin depths ``(d0, d1, d2, d3)`` as found in the checkpoint's blocks (``d0`` is not built; at least the
    release's 2, 6, 2 so that a checkpoint missing whole blocks is reported)."""

    def depth(stage: str, default: int) -> int:
        found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{stage}\.layer\.blocks\.(\d+)\.", k))]
        return max(max(found) + 1 if found else 0, default)

    d1 = max(depth("t3", 2), depth("t3_up", 2))
    d2 = max(depth("t4_pre", 6), depth("t4_post", 6))
    return (2, d1, d2, depth("t4", 2))
