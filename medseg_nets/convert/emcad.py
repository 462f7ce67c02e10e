"""EMCAD: the authors' ``EMCADNet`` state dict -> :class:`medseg_nets.nets.EMCADNet`.

Authors' code: SLDGroup/EMCAD, ``lib/networks.py`` / ``lib/decoders.py`` / ``lib/pvtv2.py`` (checked at commit
e48f54e0506f9af9348eb3f8af70ed3d7c61d330 with ``pvt_v2_b0``, 9 classes, 1-channel input). Its training scripts
(``train_synapse.py`` through ``trainer.py``'s ``torch.save(model.state_dict(), ...)``: ``best.pth``, ``last.pth``,
``epoch_*.pth``) save plain state dicts, with ``module.`` prefixes when trained on several GPUs
(``nn.DataParallel``); :func:`medseg_nets.convert.unwrap_checkpoint` removes those.

Module by module (``{n}`` a stage 1-4, ``{j}``/``{k}`` indices kept as they are)::

    conv.{0,1}                          input_adapter.{0,1}     (1x1 conv + BN, 1 -> 3 channels)
    backbone.<PVTv2 name>               encoder.<same name>     (patch_embed{n}, block{n}.{j}, norm{n})
    decoder.cab{n}.fc{1,2}              decoder.mscam{n}.cab.fc{1,2}
    decoder.sab.conv                    decoder.sab.conv (and decoder.mscam{1-4}.sab.conv: one shared SAB)
    decoder.mscb{n}.0.pconv1.{0,1}      decoder.mscam{n}.mscb.pconv1.{0,1}
    decoder.mscb{n}.0.msdc.dwconvs.{k}.{0,1}   decoder.mscam{n}.mscb.msdc.dwconvs.{k}.{0,1}
    decoder.mscb{n}.0.pconv2.{0,1}      decoder.mscam{n}.mscb.pconv2.{0,1}
    decoder.eucb{n}.up_dwc.{1,2}        decoder.eucb{n}.dwc.{0,1}  (up_dwc.0 is the parameter-free Upsample)
    decoder.eucb{n}.pwc.0               decoder.eucb{n}.pwc
    decoder.lgag{n}.{W_g,W_x,psi}.{0,1} decoder.lgag{n}.{w_g,w_x,psi}.{0,1}
    out_head{4,3,2,1}                   heads.{0,1,2,3}          (deepest first)

Older revisions of ``lib/networks.py`` named the heads the other way round (``out_head1`` on the deepest map); such
checkpoints are recognised by the heads' input widths and mapped the same way.

The authors' ``EMCADNet`` always has the 1 -> 3 channel ``conv`` (it only uses it for 1-channel inputs), so the
result always holds ``input_adapter.*``: it loads into ``EMCADNet(in_channels=1, ...)``. For a network trained on
3-channel images, drop the ``input_adapter.`` keys (they were never used) and build ``EMCADNet(in_channels=3)``.
Not stored in a state dict, so not checked here: the MSCB activation (``train_synapse.py --activation_mscb``,
``relu6`` by default and in its snapshot folder name ``..._act_mscb_relu6_...``; ``EMCADNet``'s own default is
``relu``) and ``dw_parallel``: pass the ones the checkpoint was trained with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from medseg_nets.convert import AuthorsCheckpointError
from medseg_nets.convert._rules import BN, CONV, CONV_NB, NORM, Rule, apply_rules, check_against, same_names

__all__ = ["RULES", "convert", "import_notes", "network_kwargs"]

#: the key map, authors' module -> ours
RULES: list[Rule] = [
    Rule("conv.0", "input_adapter.0", CONV),
    Rule("conv.1", "input_adapter.1", BN),
    # decoder
    Rule("decoder.cab{n}.fc1", "decoder.mscam{n}.cab.fc1", CONV_NB),
    Rule("decoder.cab{n}.fc2", "decoder.mscam{n}.cab.fc2", CONV_NB),
    Rule("decoder.sab.conv", "decoder.sab.conv", CONV_NB),
    Rule("decoder.mscb{n}.0.pconv1.0", "decoder.mscam{n}.mscb.pconv1.0", CONV_NB),
    Rule("decoder.mscb{n}.0.pconv1.1", "decoder.mscam{n}.mscb.pconv1.1", BN),
    Rule("decoder.mscb{n}.0.msdc.dwconvs.{k}.0", "decoder.mscam{n}.mscb.msdc.dwconvs.{k}.0", CONV_NB),
    Rule("decoder.mscb{n}.0.msdc.dwconvs.{k}.1", "decoder.mscam{n}.mscb.msdc.dwconvs.{k}.1", BN),
    Rule("decoder.mscb{n}.0.pconv2.0", "decoder.mscam{n}.mscb.pconv2.0", CONV_NB),
    Rule("decoder.mscb{n}.0.pconv2.1", "decoder.mscam{n}.mscb.pconv2.1", BN),
    Rule("decoder.eucb{n}.up_dwc.1", "decoder.eucb{n}.dwc.0", CONV_NB),
    Rule("decoder.eucb{n}.up_dwc.2", "decoder.eucb{n}.dwc.1", BN),
    Rule("decoder.eucb{n}.pwc.0", "decoder.eucb{n}.pwc", CONV),
    Rule("decoder.lgag{n}.W_g.0", "decoder.lgag{n}.w_g.0", CONV),
    Rule("decoder.lgag{n}.W_g.1", "decoder.lgag{n}.w_g.1", BN),
    Rule("decoder.lgag{n}.W_x.0", "decoder.lgag{n}.w_x.0", CONV),
    Rule("decoder.lgag{n}.W_x.1", "decoder.lgag{n}.w_x.1", BN),
    Rule("decoder.lgag{n}.psi.0", "decoder.lgag{n}.psi.0", CONV),
    Rule("decoder.lgag{n}.psi.1", "decoder.lgag{n}.psi.1", BN),
    # heads, deepest first in ours
] + [Rule(f"out_head{n}", f"heads.{4 - n}", CONV) for n in (4, 3, 2, 1)]
# PVTv2 encoder: same names under another prefix
RULES += same_names(
    "backbone",
    "encoder",
    {
        "patch_embed{n}.proj": CONV,
        "patch_embed{n}.norm": NORM,
        "block{n}.{j}.norm1": NORM,
        "block{n}.{j}.norm2": NORM,
        "block{n}.{j}.attn.q": CONV,
        "block{n}.{j}.attn.kv": CONV,
        "block{n}.{j}.attn.proj": CONV,
        "block{n}.{j}.attn.sr": CONV,
        "block{n}.{j}.attn.norm": NORM,
        "block{n}.{j}.mlp.fc1": CONV,
        "block{n}.{j}.mlp.dwconv.dwconv": CONV,
        "block{n}.{j}.mlp.fc2": CONV,
        "norm{n}": NORM,
    },
)

_HINTS = {
    r"^backbone\.(layer\d|conv1|bn1|fc)\b": "a ResNet encoder; only the PVTv2 encoders have a counterpart here",
    r"^backbone\.head\.": "a PVTv2 classifier head: load an ImageNet PVTv2 checkpoint with "
    "medseg_nets.nets.load_pvtv2_pretrained instead",
    r"\.mscb\d\.[1-9]": "a stack of several MSCBs per stage, which EMCADNet does not build",
    r"\.conv1x1\.": "an MSCB whose input and output widths differ, which EMCAD's MSCAMs never have",
}
_SHARED_SAB = [f"decoder.mscam{n}.sab.conv.weight" for n in (4, 3, 2, 1)]


def _get(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise AuthorsCheckpointError(f"the EMCAD checkpoint lacks the key {key!r}")
    return sd[key]


def _heads_in_current_order(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the heads of the older layout (``out_head1`` on the deepest map) to the current one."""
    heads = {n: sd.get(f"out_head{n}.weight") for n in (1, 2, 3, 4)}
    deepest = sd.get("decoder.mscb4.0.pconv2.0.weight")
    finest = sd.get("decoder.mscb1.0.pconv2.0.weight")
    if any(h is None for h in heads.values()) or deepest is None or finest is None or deepest.shape == finest.shape:
        return dict(sd)
    if heads[1].shape[1] == deepest.shape[0] and heads[4].shape[1] == finest.shape[0]:
        out = {}
        for key, value in sd.items():
            m = re.fullmatch(r"out_head(\d)\.(weight|bias)", key)
            out[f"out_head{5 - int(m.group(1))}.{m.group(2)}" if m else key] = value
        return out
    return dict(sd)


def network_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`~medseg_nets.nets.EMCADNet` arguments that fit an authors' (unwrapped) state dict (all but the
    MSCB ``activation`` and ``dw_parallel``, which a state dict does not record)."""
    from medseg_nets.nets.pvtv2 import PVT_V2_CONFIGS

    dims = tuple(int(_get(state_dict, f"backbone.patch_embed{n}.proj.weight").shape[0]) for n in (1, 2, 3, 4))
    depths = tuple(
        len({k.split(".")[2] for k in state_dict if k.startswith(f"backbone.block{n}.")}) for n in (1, 2, 3, 4)
    )
    fc1 = _get(state_dict, "backbone.block1.0.mlp.fc1.weight")
    fc1_last = _get(state_dict, "backbone.block4.0.mlp.fc1.weight")
    ratios = (fc1.shape[0] // fc1.shape[1], fc1_last.shape[0] // fc1_last.shape[1])
    variant = next(
        (
            name
            for name, cfg in PVT_V2_CONFIGS.items()
            if cfg["embed_dims"] == dims
            and cfg["depths"] == depths
            and (cfg["mlp_ratios"][0], cfg["mlp_ratios"][3]) == ratios
        ),
        None,
    )
    if variant is None:
        raise AuthorsCheckpointError(
            f"the EMCAD checkpoint's encoder (embed dims {dims}, depths {depths}) is none of the PVTv2 variants "
            f"{sorted(PVT_V2_CONFIGS)}"
        )
    pconv1 = _get(state_dict, "decoder.mscb4.0.pconv1.0.weight")
    pconv2 = _get(state_dict, "decoder.mscb4.0.pconv2.0.weight")
    kernels = []
    k = 0
    while f"decoder.mscb4.0.msdc.dwconvs.{k}.0.weight" in state_dict:
        kernels.append(int(state_dict[f"decoder.mscb4.0.msdc.dwconvs.{k}.0.weight"].shape[-1]))
        k += 1
    head = _get(state_dict, "out_head1.weight")
    in_ch = int(_get(state_dict, "conv.0.weight").shape[1])
    return {
        "in_channels": in_ch,
        "out_channels": int(head.shape[0]),
        "encoder": variant,
        "kernel_sizes": kernels,
        "expansion_factor": int(pconv1.shape[0]) // int(pconv1.shape[1]),
        "add": int(pconv2.shape[1]) == int(pconv1.shape[0]),
        "lgag_ks": int(_get(state_dict, "decoder.lgag1.W_g.0.weight").shape[-1]),
        "input_adapter": "conv",
    }


def import_notes(network_args: Mapping[str, Any]) -> list[str]:
    """What a user of the authors' weights in a network built with ``network_args`` should know."""
    return [
        "the MSCB activation is not stored in a checkpoint: the network uses "
        f"{network_args.get('activation', 'relu6')!r}; "
        "the authors' train_synapse.py trains with --activation_mscb (relu6 by default, named in its snapshot folder "
        "'..._act_mscb_<activation>_...'), their EMCADNet constructor defaults to 'relu'"
    ]


def convert(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an (unwrapped) authors' ``EMCADNet`` state dict to :class:`~medseg_nets.nets.EMCADNet`'s.

    The result loads with ``strict=True`` into ``EMCADNet(**network_kwargs(state_dict), activation=...)``; every
    key is checked against that network built on the meta device (missing, extra or mis-shaped keys raise
    :class:`~medseg_nets.convert.AuthorsCheckpointError` naming them, in our and in the authors' names).
    """
    from medseg_nets.nets.emcad import EMCADNet

    state_dict = _heads_in_current_order(state_dict)
    converted = apply_rules(state_dict, RULES, "EMCAD", _HINTS)
    if "decoder.sab.conv.weight" in converted:  # one SAB, registered under each MSCAM as well
        for key in _SHARED_SAB:
            converted[key] = converted["decoder.sab.conv.weight"]
    kwargs = network_kwargs(state_dict)
    with torch.device("meta"):
        reference = EMCADNet(**kwargs)
    check_against(converted, reference, RULES, "EMCAD")
    return converted
