"""DALight-3D: the authors' ``LightweightUNet3D`` state dict -> :class:`medseg_nets.nets.DALight3D`.

Authors' code: Dhruv27Mishra/DALight3D-paper-release, ``cnn.py`` (``LightweightUNet3D(**config)``, checked at commit
e482d5ffcf92611586bcb44d7f3893af4a6da547 on the release configuration: base 24, bottleneck 432, SSFB rank 8,
softmax head). Plain state dicts and the usual wrappers (``{"model": ...}``, ``{"state_dict": ...}``, ``module.``
prefixes) are opened by :func:`medseg_nets.convert.unwrap_checkpoint`.

Module by module (``{i}`` an index kept as is)::

    encoder.init_conv.{0,1}                     stem.{0,1}
    encoder.stages.{i}.<block>                  encoder.{i}.<block>
    encoder.downsamples.{0,1,2}                 downsample.{1,2,3}   (ours has an Identity in front of stage 0)
    decoder.upsamples.{i}                       upsample.{i}
    decoder.skip_fusions.{i}.conv.{0,1}         fusion.{i}.{conv,norm}            (SimpleSkip)
    decoder.skip_fusions.{i}.alpha              fusion.{i}.blend                  (0-d -> shape (1,))
    decoder.skip_fusions.{i}.low_rank_attn.{query,key,value,out}_proj   fusion.{i}.{query,key,value,out}
    decoder.skip_fusions.{i}.channel_gate.fc.{0,2}                       fusion.{i}.gate.{0,2}
    decoder.skip_fusions.{i}.fusion.{0,1}       fusion.{i}.fuse.{conv,norm}
    decoder.stages.{i}.<block>                  decoder.{i}.<block>
    head.head.{0,1,3}                           head.{1,2,4}      (ours: Dropout3d at head.0, GELU at head.3)

    <block>: conv{1,2}[.depthwise|.pointwise], se.fc.{0,2}, attention.{query,key,value} -> csa.*,
             skip.{0,1} -> proj.{0,1}, norm{1,2}: ScannerAwareNorm default_gamma/default_beta -> default_scale/
             default_shift and scanner_gamma.weight (K, C) + scanner_beta.weight (K, C) -> embedding.weight (K, 2C)
             (scales then shifts); a plain GroupNorm (use_scanner_norm=False) -> norm{1,2}.norm

The authors' evidential head (``use_uncertainty=True``: ``head.net.*``, Softplus evidence) has no counterpart here
and is refused, as are the ``align_enc``/``align_dec`` convs SSFB only has when widths differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from medseg_nets.convert import AuthorsCheckpointError
from medseg_nets.convert._rules import CONV, CONV_NB, LINEAR, NORM, Rule, apply_rules, check_against, renamed

__all__ = ["RULES", "convert", "import_notes", "network_kwargs"]

_ICN_PAIR = "scanner_gamma+scanner_beta"  # the two embedding tables, concatenated before the rules run


def _as_vector(name: str, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(1)


def _block_rules(authors: str, ours: str) -> list[Rule]:
    rules = []
    for n in ("1", "2"):
        rules += [
            Rule(f"{authors}.conv{n}", f"{ours}.conv{n}", CONV_NB),
            Rule(f"{authors}.conv{n}.depthwise", f"{ours}.conv{n}.depthwise", CONV_NB),
            Rule(f"{authors}.conv{n}.pointwise", f"{ours}.conv{n}.pointwise", CONV_NB),
            Rule(
                f"{authors}.norm{n}",
                f"{ours}.norm{n}",
                {"default_gamma": "default_scale", "default_beta": "default_shift"},
            ),
            Rule(f"{authors}.norm{n}.{_ICN_PAIR}", f"{ours}.norm{n}.embedding", ("weight",)),
            Rule(f"{authors}.norm{n}", f"{ours}.norm{n}.norm", NORM),  # plain GroupNorm (use_scanner_norm=False)
        ]
    return rules + renamed(
        authors,
        ours,
        {
            "se.fc.{fc}": ("se.fc.{fc}", LINEAR),
            "attention.query": ("csa.query", CONV),
            "attention.key": ("csa.key", CONV),
            "attention.value": ("csa.value", CONV),
            "skip.0": ("proj.0", CONV_NB),
            "skip.1": ("proj.1", NORM),
        },
    )


#: the key map, authors' module -> ours
RULES: list[Rule] = (
    [
        Rule("encoder.init_conv.0", "stem.0", CONV_NB),
        Rule("encoder.init_conv.1", "stem.1", NORM),
    ]
    + _block_rules("encoder.stages.{i}", "encoder.{i}")
    + [Rule(f"encoder.downsamples.{i}", f"downsample.{i + 1}", CONV) for i in range(3)]
    + [
        Rule("decoder.upsamples.{i}", "upsample.{i}", CONV),
        Rule("decoder.skip_fusions.{i}.conv.0", "fusion.{i}.conv", CONV_NB),
        Rule("decoder.skip_fusions.{i}.conv.1", "fusion.{i}.norm", NORM),
        Rule("decoder.skip_fusions.{i}", "fusion.{i}", {"alpha": "blend"}, transform=_as_vector),
        Rule("decoder.skip_fusions.{i}.low_rank_attn.query_proj", "fusion.{i}.query", CONV),
        Rule("decoder.skip_fusions.{i}.low_rank_attn.key_proj", "fusion.{i}.key", CONV),
        Rule("decoder.skip_fusions.{i}.low_rank_attn.value_proj", "fusion.{i}.value", CONV),
        Rule("decoder.skip_fusions.{i}.low_rank_attn.out_proj", "fusion.{i}.out", CONV),
        Rule("decoder.skip_fusions.{i}.channel_gate.fc.{fc}", "fusion.{i}.gate.{fc}", LINEAR),
        Rule("decoder.skip_fusions.{i}.fusion.0", "fusion.{i}.fuse.conv", CONV_NB),
        Rule("decoder.skip_fusions.{i}.fusion.1", "fusion.{i}.fuse.norm", NORM),
    ]
    + _block_rules("decoder.stages.{i}", "decoder.{i}")
    + [
        Rule("head.head.0", "head.1", CONV_NB),
        Rule("head.head.1", "head.2", NORM),
        Rule("head.head.3", "head.4", CONV),
    ]
)

_HINTS = {
    r"^head\.net\.": "the evidential head of use_uncertainty=True has no counterpart in medseg_nets; "
    "only the softmax head (use_uncertainty=False, the release configuration) converts",
    r"\.align_(enc|dec)\.": "SSFB width-alignment convs exist only for unequal encoder/decoder widths, "
    "which DALight3D does not build",
}


def _get(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise AuthorsCheckpointError(f"the DALight-3D checkpoint lacks the key {key!r}")
    return sd[key]


def network_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`~medseg_nets.nets.DALight3D` arguments that fit an authors' (unwrapped) state dict."""
    stem = _get(state_dict, "encoder.init_conv.0.weight")
    se0 = _get(state_dict, "encoder.stages.0.se.fc.0.weight")
    kwargs: dict[str, Any] = {
        "in_channels": int(stem.shape[1]),
        "out_channels": int(_get(state_dict, "head.head.3.weight").shape[0]),
        "base_channels": int(stem.shape[0]),
        "bottleneck_channels": int(_get(state_dict, "encoder.stages.3.se.fc.2.weight").shape[0]),
        "se_reduction": int(se0.shape[1]) // int(se0.shape[0]),
        "head_channels": int(_get(state_dict, "head.head.0.weight").shape[0]),
        "use_csa": "encoder.stages.2.attention.query.weight" in state_dict,
        "use_ssfb": any(k.startswith("decoder.skip_fusions.1.low_rank_attn.") for k in state_dict),
        "use_icn": "encoder.stages.0.norm1.scanner_gamma.weight" in state_dict,
        "separable": "encoder.stages.1.conv1.depthwise.weight" in state_dict,
    }
    if kwargs["use_ssfb"]:
        kwargs["ssfb_rank"] = int(_get(state_dict, "decoder.skip_fusions.1.low_rank_attn.query_proj.weight").shape[0])
    if kwargs["use_icn"]:
        kwargs["num_identifiers"] = int(state_dict["encoder.stages.0.norm1.scanner_gamma.weight"].shape[0])
    return kwargs


def import_notes(network_args: Mapping[str, Any]) -> list[str]:
    """What a user of the authors' weights in a network built with ``network_args`` should know."""
    notes = []
    if int(network_args.get("slice_axis", 0)) != 0:
        notes.append(
            f"the network attends across slices along spatial axis {network_args['slice_axis']}, while the authors' "
            "code attends along the first array axis of the NIfTI as stored (it reads (x, y, z, c) and transposes to "
            "(c, x, y, z)); to run the weights as they were trained, set network_def#slice_axis to 0 and feed "
            "volumes in the files' own orientation"
        )
    return notes


def _join_icn_tables(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    for key in list(state_dict):
        for first, second in (("scanner_gamma", "scanner_beta"), ("scanner_beta", "scanner_gamma")):
            if key.endswith(f".{first}.weight"):
                prefix = key[: -len(f".{first}.weight")]
                partner = f"{prefix}.{second}.weight"
                if partner not in state_dict:
                    raise AuthorsCheckpointError(f"the DALight-3D checkpoint has {key!r} but lacks {partner!r}")
    for key in list(out):
        if key.endswith(".scanner_gamma.weight"):
            prefix = key[: -len(".scanner_gamma.weight")]
            gamma, beta = out.pop(key), out.pop(f"{prefix}.scanner_beta.weight")
            out[f"{prefix}.{_ICN_PAIR}.weight"] = torch.cat([gamma, beta], dim=1)
    return out


def convert(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an (unwrapped) authors' ``LightweightUNet3D`` state dict to :class:`~medseg_nets.nets.DALight3D`'s.

    The result loads with ``strict=True`` into ``DALight3D(**network_kwargs(state_dict))``; every key is checked
    against that network built on the meta device (missing, extra or mis-shaped keys raise
    :class:`~medseg_nets.convert.AuthorsCheckpointError` naming them, in our and in the authors' names).
    """
    from medseg_nets.nets.dalight3d import DALight3D

    converted = apply_rules(_join_icn_tables(state_dict), RULES, "DALight-3D", _HINTS)
    kwargs = network_kwargs(state_dict)
    try:
        with torch.device("meta"):
            reference = DALight3D(**kwargs)
    except ValueError as err:
        raise AuthorsCheckpointError(f"the DALight-3D checkpoint's widths do not build a DALight3D: {err}") from err
    check_against(converted, reference, RULES, "DALight-3D")
    return converted
