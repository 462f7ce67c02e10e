"""Training-loop handlers MONAI's ignite workflows do not provide: gradient clipping and a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipping", "ProgressBar"]


class GradientClipping:
    """Clip the global gradient norm to ``max_norm`` after ``backward`` and before the optimizer step.

    Hooks MONAI's ``IterationEvents.BACKWARD_COMPLETED`` of ``SupervisedTrainer``. With AMP the gradients are
    unscaled first (``GradScaler.unscale_``), as PyTorch's AMP recipe requires.
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        params = [p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None]
        engine.state.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type))


class ProgressBar:
    """ignite's tqdm ``ProgressBar`` (iterations, rate, ETA) showing the loss, attachable from a bundle config."""

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, persist: bool = False, desc: str = "") -> None:
        self.output_transform = output_transform
        self.persist = persist
        self.desc = desc

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as _PB

        _PB(persist=self.persist, desc=self.desc or None).attach(
            engine, output_transform=self.output_transform, event_name=Events.ITERATION_COMPLETED
        )
