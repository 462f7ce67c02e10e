"""Training-loop handlers MONAI's ignite workflows do not provide: gradient clipping and a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import ValidationHandler

__all__ = ["FinalValidationHandler", "GradientClipping", "ProgressBar"]


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


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates when training completes on an epoch it did not validate.

    With MONAI's handler a run shorter than ``interval`` epochs (or one whose last epoch is not a multiple of it)
    ends without validating its last weights, so the best-model saver never writes ``models/model.pt`` for them:
    a short training from MONAI Label (``max_epochs`` below the bundle's ``val_interval``) left ``model.pt`` as it
    was. Same arguments as MONAI's (epoch-level only), plus ``final`` (default True).
    """

    def __init__(self, interval: int, validator: Any = None, epoch_level: bool = True, exec_at_start: bool = False,
                 final: bool = True) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=epoch_level, exec_at_start=exec_at_start)
        if final and not epoch_level:
            raise ValueError("FinalValidationHandler: final validation needs epoch_level=True")
        self.final = final

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.final:
            engine.add_event_handler(Events.COMPLETED, self._validate_last_epoch)

    def _validate_last_epoch(self, engine: Engine) -> None:
        if engine.state.epoch > 0 and engine.state.epoch % self.interval != 0:
            self(engine)
