"""Crash-safe checkpointing and resuming for ignite/MONAI workflows.

MONAI's ``CheckpointSaver`` writes with ``atomic=False``: a process killed while writing leaves a truncated file.
These handlers write through :func:`medseg_nets.utils.atomic_torch_save`, so the previous checkpoint stays valid
until the new one is complete, and training loses at most the epoch in progress.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

from medseg_nets.errors import InputDataError
from medseg_nets.utils.cli import as_bool
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_torch_save

__all__ = [
    "CheckpointSaver", "BestModelSaver", "ResumeFromCheckpoint", "CheckpointLoader", "MissingCheckpointError", "unwrap"
]


class MissingCheckpointError(InputDataError, FileNotFoundError):
    """A checkpoint that a workflow needs does not exist: both a ``FileNotFoundError`` and an
    :class:`~medseg_nets.errors.InputDataError` (its message names the file and how to get one)."""


def unwrap(obj: Any) -> Any:
    """The module inside DistributedDataParallel/DataParallel, else ``obj``."""
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return obj.module
    return obj


def _state(objs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: unwrap(v).state_dict() for k, v in objs.items()}


class CheckpointSaver:
    """Save the state of ``save_dict`` (network, optimizer, scheduler, trainer, ...) every ``save_interval`` epochs.

    Writes ``save_dir/filename`` atomically on global rank 0, and at the end of training (``save_final``).
    The engine it is attached to is saved under ``engine_key`` (epoch and iteration counters; ``None`` to skip),
    so a config need not reference the trainer from inside the trainer's own handler list.
    Load it back with :class:`ResumeFromCheckpoint`.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint_latest.pt",
        save_interval: int = 1,
        save_final: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object with state_dict()")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.save_final = save_final
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if get_rank() == 0:
            atomic_torch_save(_state(self.save_dict), self.path)


class BestModelSaver:
    """Save the network's ``state_dict`` to ``save_dir/filename`` (``model.pt``) whenever the evaluator's metric
    ``metric_name`` improves; attach it to the evaluator.

    Its own ``state_dict()`` holds the best value so far: put this handler into the trainer's
    :class:`CheckpointSaver` ``save_dict`` so that a resumed run does not overwrite a better model.
    NaN values never count as an improvement.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        metric_name: str,
        filename: str = "model.pt",
        greater_is_better: bool = True,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.metric_name = metric_name
        self.greater_is_better = greater_is_better
        self.best_metric: float | None = None
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None:
            raise KeyError(f"BestModelSaver: metric '{self.metric_name}' not among {sorted(engine.state.metrics)}")
        value = float(value)
        if math.isnan(value):
            return
        if self.best_metric is None or (value > self.best_metric if self.greater_is_better else value < self.best_metric):
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            if get_rank() == 0:
                atomic_torch_save(unwrap(self.network).state_dict(), self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric = state.get("best_metric")
        self.best_epoch = int(state.get("best_epoch", -1))


def _missing_weights_message(path: Path) -> str:
    return (
        f"checkpoint {path} not found: train the bundle first (python -m monai.bundle run --config_file "
        "<bundle>/configs/train.json --dataset_dir ...), or point --ckpt_path at an existing model.pt"
    )


class ResumeFromCheckpoint:
    """When ``enabled``, restore ``load_dict`` from ``ckpt_dir/filename`` (written by :class:`CheckpointSaver`)
    as training starts, so that the run continues after the last completed epoch with the same optimizer, learning
    rate schedule and best-model record. Training to a larger ``max_epochs`` than the first run is allowed.

    ``enabled=True`` with no checkpoint raises a clear :class:`MissingCheckpointError` (a ``FileNotFoundError``)
    instead of silently starting over.
    The engine it is attached to is restored from ``engine_key`` (as saved by :class:`CheckpointSaver`).
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping[str, Any],
        enabled: bool = False,
        filename: str = "checkpoint_latest.pt",
        map_location: Any = None,
        engine_key: str | None = "trainer",
    ) -> None:
        self.enabled = as_bool(enabled)
        self.path = Path(ckpt_dir) / filename
        if self.enabled and not self.path.is_file():
            raise MissingCheckpointError(
                f"resume requested but {self.path} does not exist: start without --resume true, "
                "or set --ckpt_dir to the folder of the run to continue"
            )
        self.load_dict = {k: unwrap(v) for k, v in load_dict.items()}
        self.map_location = map_location
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.load_dict[self.engine_key] = engine
        if self.enabled:
            _MonaiCheckpointLoader(
                load_path=str(self.path), load_dict=self.load_dict, map_location=self.map_location, strict=True
            ).attach(engine)


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose missing-file error says how to get weights (MONAI's is a bare
    ``FileNotFoundError``). The check runs when the engine starts, before any output is written, so that a
    workflow can still be built and inspected (e.g. ``check_properties()``) without weights. DDP-wrapped networks in
    ``load_dict`` are unwrapped."""

    def __init__(self, load_path: str, load_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(load_path, {k: unwrap(v) for k, v in load_dict.items()}, *args, **kwargs)

    def __call__(self, engine: Engine) -> None:
        if not Path(self.load_path).is_file():
            raise MissingCheckpointError(_missing_weights_message(Path(self.load_path)))
        super().__call__(engine)
