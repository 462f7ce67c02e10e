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
are derived from the window size (our network computes the index in its forward) and are dropped (:data:`DROP`
rules of :data:`RULES`).

The checkpoint is checked against ``GLIMS.authors_release(**network_kwargs(state_dict))`` built on the meta device:
widths, Swin depths and heads, window and position-embedding sizes are read from the checkpoint (Swin depths at
least the release's 2, 6, 2, so that a checkpoint missing whole blocks is reported); a missing, extra or mis-shaped
key is an error naming it in our and in the authors' names.

The converted weights reproduce the authors' network when loaded into ``GLIMS.authors_release(...)`` (see
:meth:`medseg_nets.nets.GLIMS.authors_release`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import torch

from medseg_nets.convert import AuthorsCheckpointError
from medseg_nets.convert._rules import (
    CONV,
    CONV_NB,
    DROP,
    LINEAR,
    NORM,
    PRELU,
    Rule,
    apply_rules,
    check_against,
    forward_key,
    inverse_key,
    renamed,
    same_names,
)

__all__ = ["DROPPED", "RULES", "authors_keys", "convert", "import_notes", "map_key", "network_kwargs"]

#: what :func:`map_key` returns for a key that is known and deliberately dropped
DROPPED = ""

_DACB_BRANCHES = {"conv_3x3": "branches.0", "conv_3x3_dil": "branches.1", "conv_3x3_dil2": "branches.2"}
#: a DACB branch (conv, GroupNorm, PReLU) -> ``Sequential`` indices
_GROUPCONV = {"conv": ("0", CONV), "norm": ("1", NORM), "prelu": ("2", PRELU)}
_DACB_POINTWISE = {"conv_1x1": "embed", "conv_1x1_2": "project"}
#: the authors' Swin stages (``<stage>.layer``) -> ours; ``t4_post``'s blocks sit in ``swin_up.stage``
_SWIN_STAGES = {
    "t3": ("swin_enc1", "swin_enc1"),
    "t4_pre": ("swin_enc2", "swin_enc2"),
    "t4": ("swin_bottleneck", "swin_bottleneck"),
    "t3_up": ("swin_dec", "swin_dec"),
    "t4_post": ("swin_up.stage", "swin_up"),  # (blocks, position embeddings)
}
_OUT_HEADS = {"out1": "out", "out2": "ds_heads.0", "out3": "ds_heads.1", "out4": "ds_heads.2"}
#: a Swin block's modules (same names in both networks); the index buffer is derived, not loaded
_SWIN_BLOCK = {
    "norm1": NORM,
    "attn": {"relative_position_bias_table": "relative_position_bias_table", "relative_position_index": DROP},
    "attn.qkv": LINEAR,
    "attn.proj": LINEAR,
    "norm2": NORM,
    "mlp.linear1": LINEAR,
    "mlp.fn": PRELU,
    "mlp.linear2": LINEAR,
}
#: CSAB ``csab{k}`` -> ``skip_attention.{k-1}``
_CSAB = {
    "ChannelGate.mlp.1": ("mlp.0", LINEAR),
    "ChannelGate.mlp.3": ("mlp.2", LINEAR),
    "SpatialGate.spatial.conv": ("spatial", CONV_NB),
    "SpatialGate.spatial.norm": ("spatial_norm", NORM),
    "SpatialGate.spatial.prelu": ("spatial_act", PRELU),
}
#: the release's Swin depths (``depths[0]`` is not built)
_RELEASE_DEPTHS = (2, 2, 6, 2)


def _conv_adn(authors: str, ours: str) -> list[Rule]:
    """MONAI ``Convolution`` with a PReLU ``adn`` -> ``Sequential(conv, norm, prelu)`` at ``0`` / ``2``."""
    return [Rule(f"{authors}.conv", f"{ours}.0", CONV), Rule(f"{authors}.adn.A", f"{ours}.2", PRELU)]


def _dacb(authors: str, ours: str) -> list[Rule]:
    rules = []
    for name, branch in _DACB_BRANCHES.items():
        rules += renamed(f"{authors}.{name}", f"{ours}.{branch}", _GROUPCONV)
    for name, pointwise in _DACB_POINTWISE.items():
        rules += _conv_adn(f"{authors}.{name}", f"{ours}.{pointwise}")
    return rules + [
        Rule(f"{authors}.prelu2", f"{ours}.act", PRELU),
        Rule(f"{authors}.prelu", f"{ours}.spare_act", PRELU),  # built but unused by the authors
    ]


def _swin_stage(authors: str, blocks: str, pos: str) -> list[Rule]:
    return [Rule(f"{authors}.layer", f"{pos}.pos", ("position_embeddings",))] + same_names(
        f"{authors}.layer.blocks.{{j}}", f"{blocks}.blocks.{{j}}", _SWIN_BLOCK
    )


def _rules() -> list[Rule]:
    rules = _conv_adn("stem", "stem")
    for i in range(1, 5):
        enc, dec = f"encoders.{i - 1}", f"decoders.{4 - i}"
        for level in ("1", "2"):
            rules += _dacb(f"dmsf_{i}.l{level}", f"{enc}.dacb{level}")
            rules += _dacb(f"dmsu_{i}.l{level}", f"{dec}.dacb{level}")
        rules += _conv_adn(f"dmsf_{i}.ds.conv_3x3", f"{enc}.down")
        rules += _conv_adn(f"dmsu_{i}.up.convT", f"{dec}.up")
        rules += _conv_adn(f"dmsu_{i}.conv1x1", f"{dec}.fuse")
    for authors, (blocks, pos) in _SWIN_STAGES.items():
        rules += _swin_stage(authors, blocks, pos)
    rules += [
        Rule("t4_pre.layer.downsample.norm", "merge.norm", NORM),
        Rule("t4_pre.layer.downsample.reduction", "merge.reduction", CONV_NB),
        Rule("t4_post.layer.upsample.expand", "swin_up.upsample.expand", CONV_NB),
        Rule("t4_post.layer.upsample.norm_layer", "swin_up.upsample.norm", NORM),
    ]
    rules += _conv_adn("t4_post.layer.conv1x1", "swin_up.fuse")
    for k in range(1, 6):
        rules += renamed(f"csab{k}", f"skip_attention.{k - 1}", _CSAB)
    return rules + [Rule(f"{head}.conv.conv", ours, CONV) for head, ours in _OUT_HEADS.items()]


#: the key map, authors' module -> ours
RULES: list[Rule] = _rules()


def map_key(key: str) -> Optional[str]:
    """Our name for the authors' state-dict ``key``; :data:`DROPPED` (``""``) for a derived buffer that is not
    loaded; ``None`` for a key that is not part of the authors' GLIMS."""
    hit = forward_key(key, RULES)
    if hit is None:
        return None
    _, module, tensor = hit
    return DROPPED if tensor is DROP else f"{module}.{tensor}"


def authors_keys(depths: tuple[int, ...] = _RELEASE_DEPTHS) -> list[str]:
    """The authors' parameter names for Swin ``depths`` (their ``relative_position_index`` buffers excluded): what a
    checkpoint of the release must hold (our release network's keys, named the authors' way)."""
    from medseg_nets.nets.glims import GLIMS

    with torch.device("meta"):
        ours = GLIMS.authors_release(depths=tuple(depths)).state_dict()
    keys = [inverse_key(k, RULES) for k in ours]
    assert None not in keys, "RULES do not cover GLIMS.authors_release"
    return keys


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> Optional[tuple[int, ...]]:
    return tuple(state_dict[key].shape) if key in state_dict else None


def _cube_root(n: int) -> Optional[int]:
    r = round(n ** (1 / 3))
    return next((c for c in (r - 1, r, r + 1) if c > 0 and c**3 == n), None)


def network_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``GLIMS.authors_release`` arguments that fit an authors' (unwrapped) state dict; an argument whose key
    is absent keeps the release's value (the missing key is then named by :func:`convert`)."""
    kwargs: dict[str, Any] = {"depths": list(_RELEASE_DEPTHS)}
    stem, head = _shape(state_dict, "stem.conv.weight"), _shape(state_dict, "out1.conv.conv.weight")
    if stem:
        kwargs.update(in_channels=stem[1], feature_size=stem[0])
    if head:
        kwargs["out_channels"] = head[0]

    def depth(stage: str) -> int:
        found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{stage}\.layer\.blocks\.(\d+)\.", k))]
        return max(found) + 1 if found else 0

    for index, stages in ((1, ("t3", "t3_up")), (2, ("t4_pre", "t4_post")), (3, ("t4",))):
        kwargs["depths"][index] = max(_RELEASE_DEPTHS[index], *(depth(s) for s in stages))
    table_key = "{}.layer.blocks.0.attn.relative_position_bias_table"
    heads = [_shape(state_dict, table_key.format(stage)) for stage in ("t3", "t4_pre", "t4")]
    if all(heads):
        kwargs["num_heads"] = [3] + [h[1] for h in heads]  # num_heads[0] is not built
    table = heads[0]
    if table:  # (2M - 1)^3 rows for a cubic window M; otherwise a (M, 1, 1) window with as many rows
        side = _cube_root(table[0])
        kwargs["window_size"] = (side + 1) // 2 if side else [(table[0] + 1) // 2, 1, 1]
    pos = _shape(state_dict, "t4.layer.position_embeddings")
    if pos:  # the S/32 grid's voxel count; only its product matters for the shapes
        side = _cube_root(pos[-1])
        kwargs["img_size"] = 32 * side if side else [32 * pos[-1], 32, 32]
    mlp = _shape(state_dict, "t3.layer.blocks.0.mlp.linear1.weight")
    if mlp:
        kwargs["mlp_ratio"] = mlp[0] / mlp[1]
    return kwargs


def import_notes(network_args: Mapping[str, Any]) -> list[str]:
    """What a user of the authors' weights in a bundle should know."""
    return [
        "the weights compute the authors' network in GLIMS.authors_release: run them with "
        "configs/inference_authors.json merged over configs/inference.json (the default network_def, GLIMS, "
        "loads them but computes its own relative positions and CSAB spatial gate)"
    ]


def convert(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the authors' (unwrapped, ``module.``-free) GLIMS state dict to ours.

    The result loads with ``strict=True`` into ``GLIMS.authors_release(**network_kwargs(state_dict))``.

    Raises:
        AuthorsCheckpointError: a key that is not part of the authors' GLIMS, or a key of the release (Swin depths
            inferred from the checkpoint's blocks, at least the release's) that the checkpoint lacks, or another
            shape; the message names it in our and in the authors' names.
    """
    from medseg_nets.nets.glims import GLIMS

    converted = apply_rules(state_dict, RULES, "GLIMS")
    kwargs = network_kwargs(state_dict)
    try:
        with torch.device("meta"):
            reference = GLIMS.authors_release(**kwargs)
    except ValueError as err:
        raise AuthorsCheckpointError(f"the GLIMS checkpoint's sizes ({kwargs}) do not build a GLIMS: {err}") from err
    check_against(converted, reference, RULES, "GLIMS")
    return converted
