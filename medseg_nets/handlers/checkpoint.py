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
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

from medseg_nets.errors import InputDataError
from medseg_nets.utils.cli import as_bool
from medseg_nets.utils.dist import get_rank
from medseg_nets.utils.fileio import atomic_torch_save

__all__ = [
    "CheckpointSaver", "BestModelSaver", "ResumeFromCheckpoint", "CheckpointLoader", "CheckpointError",
    "MissingCheckpointError", "check_state_dict_fits", "read_checkpoint", "unwrap"
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
            read_checkpoint(self.path)  # an empty or truncated file: a message naming it, not a pickle traceback
            _MonaiCheckpointLoader(
                load_path=str(self.path), load_dict=self.load_dict, map_location=self.map_location, strict=True
            ).attach(engine)


class CheckpointError(InputDataError):
    """A checkpoint that exists but cannot be used: empty, truncated, not a PyTorch file, or the weights of another
    network. The message names the file and what was expected."""


def read_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """``torch.load`` (weights only) of ``path``, with a :class:`CheckpointError` naming the file when it is empty,
    truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(_missing_weights_message(path))
    expected = "expected a model.pt written by this bundle's train.json (or converted with tools/import_weights.py)"
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); {expected}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zipfile/pickle/EOF/RuntimeError, depending on where the file is cut
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            f"); the file is truncated or not a PyTorch checkpoint ({size} bytes); {expected}"
        ) from e
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict; {expected}")
    return dict(ckpt)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def check_state_dict_fits(module: torch.nn.Module, state: Any, path: str | Path) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` when ``state`` is not a state dict of ``module``
    (missing or unexpected keys, other shapes), with a few examples instead of every key."""
    name = type(module).__name__
    if not _is_state_dict(state):
        keys = list(state)[:5] if isinstance(state, Mapping) else []
        raise CheckpointError(
            f"checkpoint {path} is not a state dict of {name} (top-level keys {keys}); expected the model.pt "
            "weights of this bundle's network"
        )
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if items:
                parts.append(f"{len(items)} key(s) {what} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(
            f"checkpoint {path} does not fit this bundle's network {name}: {'; '.join(parts)}; expected weights "
            "trained with this bundle's configs (is it another bundle's or another configuration's model.pt?)"
        )


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` with errors that name the file and say what was expected: a missing file
    (how to get weights), an empty, truncated or non-PyTorch file, or the weights of another network (a count and
    examples of the keys that differ, not all of them). A training checkpoint (``checkpoint_latest.pt``, whose
    ``network`` entry holds the weights) is accepted for a single network to load. The check runs when the engine
    starts, before any output is written, so that a workflow can still be built and inspected (e.g.
    ``check_properties()``) without weights. DDP-wrapped networks in ``load_dict`` are unwrapped."""

    def __init__(self, load_path: str, load_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(load_path, {k: unwrap(v) for k, v in load_dict.items()}, *args, **kwargs)

    def __call__(self, engine: Engine) -> None:
        ckpt = read_checkpoint(self.load_path, self.map_location)
        if not self.strict_shape:
            super().__call__(engine)
            return
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in ckpt:
            if isinstance(self.load_dict[first], torch.nn.Module) and _is_state_dict(ckpt.get("network")):
                self.logger.info(f"{self.load_path}: a training checkpoint; loading its 'network' weights")
                ckpt = {first: ckpt["network"]}
            else:
                ckpt = {first: ckpt}
        for key, obj in self.load_dict.items():
            if key not in ckpt:
                raise CheckpointError(f"checkpoint {self.load_path} has no '{key}' entry (it has {sorted(ckpt)[:8]})")
            if isinstance(obj, torch.nn.Module) and self.strict:
                check_state_dict_fits(obj, ckpt[key], self.load_path)
        prior_max_epochs = engine.state.max_epochs if engine is not None else None
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=ckpt, strict=self.strict)
        if engine is not None:
            engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")
