"""Weights trained with the authors' own code, converted to this package's networks.

``convert_authors_state_dict(network, checkpoint)`` takes what the authors' training code saves (a plain state
dict, GLIMS's ``{"epoch", "best_acc", "state_dict"}``, a ``{"model": ...}``/``{"state_dict": ...}`` wrapper,
``module.`` prefixes left by DDP / ``DataParallel``) and returns a state dict that the matching network of
:mod:`medseg_nets.nets` loads with ``strict=True``. Every key is mapped explicitly: a key the mapping does not know,
or a key our network needs that the checkpoint lacks, is an :class:`AuthorsCheckpointError` that names it.

One module per network (``glims``, ``dalight3d``, ``emcad``) holds its key mapping as a function
``convert(state_dict) -> state_dict`` working on the unwrapped, prefix-free state dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["AuthorsCheckpointError", "NETWORKS", "convert_authors_state_dict", "unwrap_checkpoint"]

#: networks with a converter: name -> module of this package
NETWORKS = ("glims", "dalight3d", "emcad")

# wrappers the authors' (and common) training loops put around the state dict, tried in this order
_WRAPPER_KEYS = ("state_dict", "model", "network", "net")


class AuthorsCheckpointError(ValueError):
    """A checkpoint that is not (a state dict of) the authors' network; the message names the key(s)."""


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint`` as a flat state dict: wrapper dicts opened, ``module.`` prefixes removed."""
    if not isinstance(checkpoint, Mapping):
        raise AuthorsCheckpointError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    sd: Mapping[str, Any] = checkpoint
    while not all(torch.is_tensor(v) for v in sd.values()):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            others = sorted(k for k, v in sd.items() if not torch.is_tensor(v))
            raise AuthorsCheckpointError(
                f"no state dict found in the checkpoint: entries {others[:8]} are not tensors and none of "
                f"{list(_WRAPPER_KEYS)} holds a state dict"
            )
        sd = sd[inner]
    if not sd:
        raise AuthorsCheckpointError("the checkpoint's state dict is empty")
    out = {}
    for key, value in sd.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def convert_authors_state_dict(network: str, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map the authors' checkpoint of ``network`` (one of :data:`NETWORKS`) to this package's state dict."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}, expected one of {list(NETWORKS)}")
    module = importlib.import_module(f"{__name__}.{network}")
    return module.convert(unwrap_checkpoint(checkpoint))
