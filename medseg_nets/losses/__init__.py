"""Losses MONAI lacks."""

from .mutation import DiceBCELoss, MutationLoss, mutation_subsets

__all__ = ["DiceBCELoss", "MutationLoss", "mutation_subsets"]
