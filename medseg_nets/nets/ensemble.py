"""Ensembles of one network trained several times (e.g. on different folds): the mean of their outputs."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["MeanEnsemble"]


class MeanEnsemble(nn.Module):
    """``y = mean_i(member_i(x))``: the members' raw outputs (logits) averaged, as the GLIMS authors' BraTS 2023
    inference averages the logits of two models (``test_BraTS.py``). Sliding-window inference of the ensemble is the
    mean of the members' sliding-window outputs (the window blending is linear).

    Build it from one network and the checkpoints of its members with :meth:`for_checkpoints`; the members' weights
    are then loaded by :class:`medseg_nets.handlers.EnsembleCheckpointLoader` when the workflow starts.

    Args:
        members: the networks (same output shape).
        checkpoints: the checkpoint path of each member, for :class:`~medseg_nets.handlers.EnsembleCheckpointLoader`
            (``None``: none recorded).
    """

    def __init__(self, members: Sequence[nn.Module], checkpoints: Sequence[str] | None = None) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        if checkpoints is not None and len(checkpoints) != len(members):
            raise ValueError(f"{len(members)} members but {len(checkpoints)} checkpoints")
        self.members = nn.ModuleList(members)
        self.checkpoints = [str(c) for c in checkpoints] if checkpoints is not None else None

    @classmethod
    def for_checkpoints(cls, network: nn.Module, checkpoints: Sequence[str | None]) -> "MeanEnsemble":
        """One copy of ``network`` per checkpoint path; ``None`` or empty paths are skipped (an optional second
        model), so that a single given checkpoint gives a one-member ensemble, the plain network."""
        paths = [str(c) for c in checkpoints if c is not None and str(c).strip() not in ("", "None")]
        if not paths:
            raise ValueError(f"no checkpoint given for the ensemble (got {list(checkpoints)})")
        members = [network] + [copy.deepcopy(network) for _ in paths[1:]]
        return cls(members, paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.members[0](x)
        for member in self.members[1:]:
            y = y + member(x)
        return y / len(self.members) if len(self.members) > 1 else y
