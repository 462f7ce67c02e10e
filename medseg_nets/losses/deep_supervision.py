"""Deep supervision over outputs stacked on one tensor (as MONAI's ``DynUNet`` and this package's ``GLIMS`` return).

MONAI's ``DeepSupervisionLoss`` takes a *list* of outputs; a network that stays TorchScript-friendly returns one
tensor ``(B, K, C, *spatial)`` in training mode instead (main output first). :class:`StackedDeepSupervisionLoss`
unbinds it and applies ``DeepSupervisionLoss``; a plain ``(B, C, *spatial)`` tensor (eval mode, or a network
without deep supervision) gets the base loss alone. Usable from a bundle config::

    {"_target_": "medseg_nets.losses.deep_supervision.StackedDeepSupervisionLoss",
     "loss": {"_target_": "medseg_nets.losses.DiceBCELoss"}, "weight_mode": "exp"}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss

__all__ = ["StackedDeepSupervisionLoss"]


class StackedDeepSupervisionLoss(nn.Module):
    """``DeepSupervisionLoss(loss, weight_mode, weights)`` on ``list(torch.unbind(input, dim=1))`` when ``input``
    has one more dimension than ``target``; ``loss(input, target)`` otherwise.

    ``weight_mode="exp"`` weighs the outputs 1, 1/2, 1/4, ... (main output first); see MONAI's
    ``DeepSupervisionLoss`` for ``"same"``, ``"two"`` and explicit ``weights``. Each lower-resolution output is
    compared with the full-size target (the network upsamples its auxiliary heads to the input size).
    """

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weight_mode: str = "exp",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.deep_supervision = DeepSupervisionLoss(loss, weight_mode=weight_mode, weights=weights)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() == target.dim() + 1:
            return self.deep_supervision(list(torch.unbind(input, dim=1)), target)
        if input.dim() != target.dim():
            raise ValueError(
                f"input {tuple(input.shape)} must have the target's number of dimensions {target.dim()} "
                f"(one output) or one more (outputs stacked on dim 1); target {tuple(target.shape)}"
            )
        return self.loss(input, target)
