"""MUTATION multi-stage loss of EMCAD.

Rahman & Marculescu, "EMCAD: Efficient Multi-scale Convolutional Attention Decoding for Medical Image Segmentation",
CVPR 2024 (arXiv 2405.06880), which reuses the multi-stage loss of the authors' earlier MERIT work (MIDL 2023).

For the head outputs ``p_1 .. p_n`` (``n = 4`` for EMCAD) the loss is

    L = sum over every non-empty subset S of {1..n} of  L_base( sum_{i in S} p_i , y )

i.e. ``2**n - 1`` terms (15 for four heads), each the base loss of the *sum of the logits* of the heads in the subset.
The terms are summed (``reduction="sum"``, the reference's choice); ``reduction="mean"`` divides by the number of
terms, which only rescales the loss (and so the effective learning rate) by ``1 / (2**n - 1)``.
The subsets are enumerated by size, then lexicographically (``itertools.combinations``).

The default base loss is ``lambda_ce * CE + lambda_dice * Dice`` with ``0.3 / 0.7``:

- ``sigmoid=False`` (default, mutually exclusive classes): MONAI ``DiceCELoss`` with softmax, the target a label map
  ``(B, 1, H, W)`` one-hot encoded (``to_onehot_y``) or already one-hot;
- ``sigmoid=True`` (overlapping regions such as the BraTS TC/WT/ET channels): MONAI ``DiceLoss(sigmoid=True)`` plus
  ``BCEWithLogitsLoss`` on a multi-channel binary target (MONAI's ``DiceCELoss`` would apply a softmax
  cross-entropy to a multi-channel sigmoid output).

Any other base loss ``loss(input, target) -> scalar`` can be given instead (e.g. from a MONAI bundle config:
``{"_target_": "medseg_nets.losses.mutation.MutationLoss", "loss": {"_target_": "DiceFocalLoss", ...}}``).
A single tensor (e.g. an eval-mode network output) is passed to the base loss directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.losses import DiceCELoss, DiceLoss

__all__ = ["DiceBCELoss", "MutationLoss", "mutation_subsets"]


def mutation_subsets(n: int) -> list[tuple[int, ...]]:
    """All non-empty subsets of ``range(n)``, by size then lexicographically (``2**n - 1`` of them)."""
    if n < 1:
        raise ValueError(f"need at least one output, got {n}.")
    return [s for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]


class DiceBCELoss(nn.Module):
    """``lambda_dice * Dice(sigmoid) + lambda_ce * BCEWithLogits`` for multi-label (overlapping) targets."""

    def __init__(
        self,
        include_background: bool = True,
        squared_pred: bool = False,
        batch: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background=include_background,
            sigmoid=True,
            squared_pred=squared_pred,
            batch=batch,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape.")
        target = target.to(input.dtype)
        return self.lambda_dice * self.dice(input, target) + self.lambda_ce * self.bce(input, target)


class MutationLoss(nn.Module):
    """MUTATION loss: the base loss of every non-empty subset-sum of the head outputs, summed (see module doc).

    Args:
        loss: base loss ``loss(input, target)``; when None it is built from the arguments below.
        lambda_ce: weight of the cross-entropy term of the default base loss (0.3).
        lambda_dice: weight of the Dice term of the default base loss (0.7).
        sigmoid: multi-label outputs (sigmoid Dice + BCE) instead of mutually exclusive classes (softmax Dice + CE).
        to_onehot_y: one-hot encode a label-map target (softmax case only; default True).
        include_background: include channel 0 in the Dice term.
        squared_pred: squared terms in the Dice denominator.
        batch: Dice over the whole batch instead of per sample.
        smooth_nr, smooth_dr: Dice smoothing.
        reduction: "sum" (reference) or "mean" over the ``2**n - 1`` terms.

    Forward: ``outputs`` is a tensor (base loss only) or a sequence of ``n`` tensors of the same shape (the network's
    training-mode list); ``target`` as the base loss expects it.
    """

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lambda_ce: float = 0.3,
        lambda_dice: float = 0.7,
        sigmoid: bool = False,
        to_onehot_y: bool = True,
        include_background: bool = True,
        squared_pred: bool = False,
        batch: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction
        if loss is None:
            if sigmoid:
                loss = DiceBCELoss(
                    include_background=include_background,
                    squared_pred=squared_pred,
                    batch=batch,
                    smooth_nr=smooth_nr,
                    smooth_dr=smooth_dr,
                    lambda_dice=lambda_dice,
                    lambda_ce=lambda_ce,
                )
            else:
                loss = DiceCELoss(
                    include_background=include_background,
                    to_onehot_y=to_onehot_y,
                    softmax=True,
                    squared_pred=squared_pred,
                    batch=batch,
                    smooth_nr=smooth_nr,
                    smooth_dr=smooth_dr,
                    lambda_dice=lambda_dice,
                    lambda_ce=lambda_ce,
                )
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        outputs = list(outputs)
        subsets = mutation_subsets(len(outputs))
        total = outputs[0].new_zeros(())
        for subset in subsets:
            mixed = outputs[subset[0]]
            for i in subset[1:]:
                mixed = mixed + outputs[i]
            total = total + self.loss(mixed, target)
        if self.reduction == "mean":
            total = total / len(subsets)
        return total
