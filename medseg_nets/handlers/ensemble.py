"""Loading the weights of a :class:`~medseg_nets.nets.ensemble.MeanEnsemble`, one checkpoint per member."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

from medseg_nets.handlers.checkpoint import CheckpointLoader, unwrap

__all__ = ["EnsembleCheckpointLoader"]


class EnsembleCheckpointLoader:
    """Load ``ensemble.checkpoints[i]`` into ``ensemble.members[i]`` when the engine starts, each as
    :class:`~medseg_nets.handlers.CheckpointLoader` with ``load_dict={"model": member}`` does (a missing file is an
    error that names it and says how to get weights; a plain state dict or ``{"model": ...}`` checkpoint).

    Args:
        ensemble: a :class:`~medseg_nets.nets.ensemble.MeanEnsemble` built with its checkpoints.
        kwargs: passed to each :class:`~medseg_nets.handlers.CheckpointLoader` (e.g. ``map_location``, ``strict``).
    """

    def __init__(self, ensemble: Any, **kwargs: Any) -> None:
        ensemble = unwrap(ensemble)
        if getattr(ensemble, "checkpoints", None) is None:
            raise ValueError("the ensemble has no checkpoints: build it with MeanEnsemble.for_checkpoints")
        self.loaders = [
            CheckpointLoader(path, {"model": member}, **kwargs)
            for path, member in zip(ensemble.checkpoints, ensemble.members)
        ]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for loader in self.loaders:
            loader(engine)
